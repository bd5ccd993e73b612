"""Sources for ``vfiomig send``: ``file:PATH``, ``fd:N`` and ``synth:SIZE[:SEED]``."""

from __future__ import annotations

import os

import numpy as np
import trio

from vfiomig._core._errors import UsageError
from vfiomig._core._wire import wrap_config
from vfiomig.sources._base import Source

#: Synthetic state is made of blocks of this size, each a function of (seed, block number),
#: so any slice of it can be produced (and checked) without the rest.
SYNTH_BLOCK = 1024 * 1024


_BASE: dict[int, np.ndarray] = {}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def synth_block(seed: int, block: int) -> bytes:
    """Block ``block`` of the synthetic state with ``seed``.

    A seeded random base block, XORed word by word with a per-block key and the word's
    position: every block differs, and producing one runs at memory speed.
    """
    base = _BASE.get(seed)
    if base is None:
        base = np.random.default_rng(seed).integers(0, 2**64, SYNTH_BLOCK // 8, dtype=np.uint64)
        _BASE.clear()
        _BASE[seed] = base
    key = np.uint64(_splitmix64(seed * 0x100000001B3 + block))
    return (base ^ key ^ _WORD_INDEX).tobytes()


_WORD_INDEX = np.arange(SYNTH_BLOCK // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def synth_config_body(seed: int) -> bytes:
    """The config body that goes with a synthetic state (a few hundred bytes, seeded)."""
    return np.random.default_rng([seed, 0xC0F16]).bytes(256)


class SynthSource(Source):
    """``synth:SIZE[:SEED]``: ``SIZE`` bytes of seeded pseudo-random state, streamed."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.description = f"synth:{size}:{seed}"
        self._offset = 0
        self._block_no = -1
        self._block = b""

    async def read(self, max_bytes: int) -> bytes:
        out = bytearray()
        while len(out) < max_bytes and self._offset < self.size:
            b, off = divmod(self._offset, SYNTH_BLOCK)
            if b != self._block_no:
                self._block, self._block_no = synth_block(self.seed, b), b
            n = min(max_bytes - len(out), SYNTH_BLOCK - off, self.size - self._offset)
            out += self._block[off : off + n]
            self._offset += n
        await trio.lowlevel.checkpoint()
        return bytes(out)

    async def config_blob(self) -> bytes:
        return wrap_config(synth_config_body(self.seed))


class FdSource(Source):
    """Reads a descriptor (a file, a pipe) until end of file, in a worker thread."""

    def __init__(self, fd: int, *, owned: bool, description: str) -> None:
        self.fd = fd
        self.owned = owned
        self.description = description
        self._closed = False

    async def read(self, max_bytes: int) -> bytes:
        return await trio.to_thread.run_sync(os.read, self.fd, max_bytes)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self.owned:
                os.close(self.fd)


def open_file_source(path: str) -> FdSource:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open source file {path!r}: {exc.strerror}") from exc
    return FdSource(fd, owned=True, description=f"file:{path}")


def open_fd_source(arg: str) -> FdSource:
    try:
        fd = int(arg)
        os.fstat(fd)
    except (ValueError, OSError):
        raise UsageError(f"source fd:{arg} is not an open descriptor") from None
    return FdSource(fd, owned=True, description=f"fd:{fd}")


def open_synth_source(arg: str) -> SynthSource:
    from vfiomig._units import parse_size

    size_text, _, seed_text = arg.partition(":")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise UsageError(f"source synth:{arg} has a bad seed {seed_text!r}") from None
    return SynthSource(parse_size(size_text), seed)
