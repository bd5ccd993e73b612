"""A small seeded, coverage-guided mutation engine (used in CI, and when atheris is absent).

Coverage is line coverage of vfiomig's Python modules, collected with ``sys.settrace``; an
input that reaches a new line joins the working corpus. It finds less than libFuzzer but
needs nothing beyond the standard library, and a seed makes every run repeatable.
"""

from __future__ import annotations

import random
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

CORPUS = Path(__file__).resolve().parent / "corpus"

#: Values a decoder is most likely to mishandle: zero, limits, the reserved idx, 4 GiB.
INTERESTING_U32 = (0, 1, 11, 12, 13, 0x40, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


@dataclass
class Result:
    target: str
    runs: int = 0
    corpus: int = 0
    lines: int = 0
    seconds: float = 0.0
    crashes: list[tuple[bytes, str]] = field(default_factory=list)


def load_corpus(target: str) -> list[bytes]:
    d = CORPUS / target
    return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # a random byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2 and len(buf) >= 4:  # an interesting u32, either byte order
            i = rng.randrange(len(buf) - 3)
            fmt = rng.choice((">I", "<I"))
            buf[i : i + 4] = struct.pack(fmt, rng.choice(INTERESTING_U32))
        elif op == 3:  # insert bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and buf:  # delete bytes
            del buf[pos : pos + rng.randint(1, 32)]
        elif op == 5 and pool:  # splice another input
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            buf[pos:] = other[j:]
        elif op == 6 and buf:  # duplicate a range (a second packet, a repeated idx)
            j = rng.randrange(len(buf))
            buf[pos:pos] = buf[j : j + rng.randint(1, 400)]
    return bytes(buf[:65536])


class _Coverage:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lines: set[tuple[str, int]] = set()
        self.new = 0

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.prefix in frame.f_code.co_filename:
            return self._local
        return None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            key = (frame.f_code.co_filename, frame.f_lineno)
            if key not in self.lines:
                self.lines.add(key)
                self.new += 1
        return self._local

    def run(self, fn: Callable[[bytes], None], data: bytes) -> int:
        self.new = 0
        sys.settrace(self._global)
        try:
            fn(data)
        finally:
            sys.settrace(None)
        return self.new


def fuzz(
    target: str,
    fn: Callable[[bytes], None],
    *,
    seconds: float,
    seed: int,
    max_runs: int | None = None,
    extra: Iterable[bytes] = (),
) -> Result:
    """Replay the corpus, then mutate for ``seconds`` (or ``max_runs`` inputs).

    A crash is any exception the target lets out; it is recorded with its input and the
    run carries on.
    """
    rng = random.Random(seed)
    cov = _Coverage("/vfiomig/")
    pool = [*load_corpus(target), *extra] or [b""]
    result = Result(target)
    t0 = time.monotonic()

    def one(data: bytes) -> int:
        result.runs += 1
        try:
            return cov.run(fn, data)
        except Exception as exc:
            result.crashes.append((data, f"{type(exc).__name__}: {exc}"))
            return 0

    for data in list(pool):
        one(data)
    while time.monotonic() - t0 < seconds and (max_runs is None or result.runs < max_runs):
        data = mutate(rng.choice(pool), rng, pool)
        if one(data):
            pool.append(data)
    result.corpus = len(pool)
    result.lines = len(cov.lines)
    result.seconds = time.monotonic() - t0
    return result
