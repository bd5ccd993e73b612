"""The ``vfio_user_dirty`` fuzz target: the server's sparse dirty log against a reference.

`DirtyLog` computes dirty bitmaps a chunk at a time with numpy (groups reduced at their
starts, runs spread with running sums). The reference is the definition, page by page:
an output page of ``pgsize`` bytes at ``start + k * pgsize`` is dirty if any logging page
it overlaps was marked, and a report clears the logging pages it covers.

An input is ``[log shift][size]`` then records ``[op][a][b][c]``: op even marks ``b``
pages at page ``a * 2**(c % 13)`` (anywhere in a region of two chunks and more), op odd
reports ``b + 1`` output pages of ``512 << (c % 8)`` bytes from output page ``a`` with
the region shifted by ``op >> 1 & 3`` pages (a region not aligned to the logging page).
Every report must equal the reference's, and a log with nothing left dirty must hold no
memory.
"""

from __future__ import annotations

from fuzz.vfio_user_server import FuzzBug
from vfiomig.vfio_user._layouts import bitmap_size
from vfiomig.vfio_user.server._dirty import CHUNK_PAGES, DirtyLog

PAGE = 4096


def _reference(dirty: set[int], log: int, start: int, length: int, pgsize: int) -> bytes:
    out = bytearray(bitmap_size(length, pgsize))
    for k in range(length // pgsize):
        lo, hi = (start + k * pgsize) // log, (start + (k + 1) * pgsize - 1) // log
        if any(p in dirty for p in range(lo, hi + 1)):
            out[k >> 3] |= 1 << (k & 7)
    return bytes(out)


def fuzz_vfio_user_dirty(data: bytes) -> None:
    if len(data) < 2:
        return
    log = PAGE << (data[0] % 3)
    pages = 2 * CHUNK_PAGES + data[1] * 977
    size = pages * log
    dirty_log = DirtyLog(size, log)
    dirty: set[int] = set()
    for pos in range(2, len(data) - 3, 4):
        op, a, b, c = data[pos : pos + 4]
        if op % 2 == 0:
            first = min(a << (c % 13), pages - 1)
            count = min(b + 1, pages - first)
            dirty_log.mark(first * log + (c & 1) * 100, count * log - (c & 1) * 100)
            dirty.update(range(first, first + count))
            continue
        pgsize = 512 << (c % 8)
        shift = (op >> 1 & 3) * PAGE
        npages = min(b + 1, (size - shift) // pgsize)
        start = min(a * pgsize * 97, size - shift - npages * pgsize) // pgsize * pgsize + shift
        if npages <= 0 or start < 0:
            continue
        length = npages * pgsize
        got = dirty_log.take(start, length, pgsize)
        expected = _reference(dirty, log, start, length, pgsize)
        if got != expected:
            raise FuzzBug(
                f"report {start:#x}+{length:#x} in {pgsize:#x} pages (logging {log:#x}): "
                f"{got.hex()} != {expected.hex()}"
            )
        dirty -= set(range(start // log, (start + length - 1) // log + 1))
    if not dirty and dirty_log.chunks:
        raise FuzzBug(f"{len(dirty_log.chunks)} chunks held with nothing dirty")
