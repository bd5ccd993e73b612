"""Sources for ``vfiomig send``: ``file:PATH``, ``fd:N`` and ``synth:SIZE[:SEED]``."""

from __future__ import annotations

import os
import stat

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


def _base(seed: int) -> np.ndarray:
    """The seed's random base block, already XORed with each word's position key."""
    base = _BASE.get(seed)
    if base is None:
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 2**64, SYNTH_BLOCK // 8, dtype=np.uint64) ^ _WORD_INDEX
        _BASE.clear()
        _BASE[seed] = base
    return base


def _key(seed: int, block: int) -> np.uint64:
    return np.uint64(_splitmix64(seed * 0x100000001B3 + block))


def synth_block(seed: int, block: int) -> bytes:
    """Block ``block`` of the synthetic state with ``seed``.

    A seeded random base block, XORed word by word with a per-block key and the word's
    position: every block differs, and producing one runs at memory speed.
    """
    return (_base(seed) ^ _key(seed, block)).tobytes()


def synth_block_into(seed: int, block: int, out: memoryview) -> None:
    """`synth_block` written straight into ``out`` (``SYNTH_BLOCK`` bytes)."""
    np.bitwise_xor(_base(seed), _key(seed, block), out=np.frombuffer(out, dtype=np.uint64))


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

    fills_buffers = True

    def size_hint(self) -> int:
        return self.size - self._offset

    async def read_into(self, buf: memoryview) -> int:
        n = min(len(buf), self.size - self._offset)
        done = 0
        while done < n:
            b, off = divmod(self._offset, SYNTH_BLOCK)
            k = min(n - done, SYNTH_BLOCK - off)
            if k == SYNTH_BLOCK:  # a whole block: made in place
                synth_block_into(self.seed, b, buf[done : done + k])
            else:
                if b != self._block_no:
                    self._block, self._block_no = synth_block(self.seed, b), b
                buf[done : done + k] = self._block[off : off + k]
            done += k
            self._offset += k
        await trio.lowlevel.checkpoint()
        return n

    async def config_blob(self) -> bytes:
        return wrap_config(synth_config_body(self.seed))

    def native_stream(self) -> tuple[object, ...] | None:
        if self._offset or not 0 <= self.seed < 2**64:
            return None
        return ("synth", self.size, self.seed, _base(self.seed))


class FdSource(Source):
    """Reads a descriptor (a file, a pipe) until end of file, in a worker thread."""

    def __init__(self, fd: int, *, owned: bool, description: str) -> None:
        self.fd = fd
        self.owned = owned
        self.description = description
        self._closed = False
        try:
            self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self._regular = False

    fills_buffers = True

    async def read(self, max_bytes: int) -> bytes:
        return await trio.to_thread.run_sync(os.read, self.fd, max_bytes)

    async def read_into(self, buf: memoryview) -> int:
        if self._regular:
            # A regular file is read from the page cache (or a read-ahead away): a copy,
            # cheaper here than a worker thread's round trip per buffer.
            n = _fill(self.fd, buf)
            await trio.lowlevel.checkpoint()
            return n
        return await trio.to_thread.run_sync(_fill, self.fd, buf)

    def native_stream(self) -> tuple[object, ...] | None:
        # A pipe or a socket is polled before each read, so that a cancel stops the wait.
        return None if self._closed else ("fd", self.fd, not self._regular)

    def size_hint(self) -> int | None:
        """A regular file's bytes from the current offset; None for a pipe or a socket."""
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            return max(st.st_size - os.lseek(self.fd, 0, os.SEEK_CUR), 0)
        except OSError:
            return None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self.owned:
                os.close(self.fd)


def _fill(fd: int, buf: memoryview) -> int:
    """Read ``fd`` into ``buf`` until it is full or the stream ends (a worker thread's)."""
    done = 0
    while done < len(buf):
        n = os.readv(fd, [buf[done:]])
        if n == 0:
            break
        done += n
    return done


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
