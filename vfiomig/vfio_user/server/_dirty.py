"""The dirty-page log of one DMA region: sparse, bulk, bounded by what the emulator writes.

A client turns logging on for every mapped region at once (DMA_LOGGING_START), with a
page size as small as 4 KiB over regions as large as 8 TiB: a plain bitmap would be
256 MiB per region, allocated by an 80-byte request. `DirtyLog` allocates nothing up
front: its bits live in chunks of `CHUNK_BYTES` (one bit per logging page, so 32 KiB
covers 1 GiB of guest memory at 4 KiB pages), a chunk appearing only when the emulator
dirties a page inside it. Memory is one bit per logging page of the memory the emulator
actually wrote, at most one bit per logging page of the region. A report (DMA_LOGGING_REPORT,
DMA_UNMAP's bitmap) visits only the chunks that exist, with numpy's bulk operations, so
its time follows what was dirtied and the size of the bitmap asked for (at most the
server's ``max_data_xfer_size``), never the size of the region: an 8 TiB region reported
in 1 TiB pages is 8 bits of work per chunk.

Bits are in the kernel's and libvfio-user's order: page ``n`` is bit ``n % 8`` of byte
``n // 8``.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

#: Bytes of bitmap per chunk (32 KiB: 262144 logging pages, 1 GiB at 4 KiB pages).
CHUNK_BYTES: Final = 32 * 1024
CHUNK_PAGES: Final = CHUNK_BYTES * 8

Bits = npt.NDArray[np.uint8]


class DirtyLog:
    """One bit per ``pgsize`` page of a region ``size`` bytes long, allocated by chunk."""

    __slots__ = ("chunks", "pages", "pgsize")

    def __init__(self, size: int, pgsize: int) -> None:
        self.pgsize = pgsize
        self.pages = -(-size // pgsize)
        self.chunks: dict[int, Bits] = {}

    @property
    def nbytes(self) -> int:
        """Memory the bits take now."""
        return len(self.chunks) * CHUNK_BYTES

    def mark(self, start: int, length: int) -> None:
        """Bytes ``start..start+length`` of the region (inside it, length > 0) were written."""
        first, last = start // self.pgsize, (start + length - 1) // self.pgsize
        for index, lo, hi in self._spans(first, last, existing=False):
            chunk = self.chunks.get(index)
            if chunk is None:
                chunk = self.chunks[index] = np.zeros(CHUNK_BYTES, np.uint8)
            _set(chunk, lo, hi, True)

    def take(self, start: int, length: int, pgsize: int) -> bytes:
        """The dirty bitmap of bytes ``start..start+length`` of the region in ``pgsize``
        pages (``length`` a multiple of it), in whole u64 words; the logging pages it
        covers are clean afterwards.

        An output page is dirty when any logging page it overlaps is: ``pgsize`` larger
        than the logging page combines bits, smaller repeats them (libvfio-user's
        ``dirty_page_get_combine`` / ``_extend``).
        """
        log = self.pgsize
        npages = length // pgsize
        first, last = start // log, (start + length - 1) // log
        if log > pgsize:
            out = self._take_spread(first, last, start, pgsize, npages)
        else:
            out = self._take_combined(first, last, start, pgsize, npages)
        packed = np.packbits(out[:npages], bitorder="little").tobytes()
        return packed + bytes(-(-npages // 64) * 8 - len(packed))

    def _take_combined(
        self, first: int, last: int, start: int, pgsize: int, npages: int
    ) -> npt.NDArray[np.bool_]:
        """Output pages of ``factor`` logging pages each, a chunk at a time: the bits
        split where groups of ``factor`` start and each piece reduced with one
        ``logical_or.reduceat`` (well under a millisecond per chunk whatever the factor,
        so even a whole 8 TiB region dirty at 4 KiB, 8192 chunks, takes seconds, not
        hours). Output boundaries not on a logging page (a region not aligned to the
        logging page) cut one logging page each: that page, the first of a group, also
        counts for the group before."""
        factor = pgsize // self.pgsize
        straddle = start % self.pgsize != 0
        out = np.zeros(npages + 1, np.bool_)
        for index, lo, hi in self._spans(first, last):
            bits = np.unpackbits(self.chunks[index], bitorder="little")[lo : hi + 1]
            at = index * CHUNK_PAGES + lo - first  # logging pages from ``first`` to bits[0]
            starts = np.arange((-at) % factor, len(bits), factor, dtype=np.int64)
            pieces = starts if len(starts) and starts[0] == 0 else np.r_[0, starts]
            dirty = np.logical_or.reduceat(bits.astype(np.bool_), pieces)
            out[(at + pieces) // factor] |= dirty
            if straddle and len(starts):
                groups = (at + starts) // factor
                cut = groups > 0  # group 0's first page has no group before
                out[groups[cut] - 1] |= bits[starts[cut]].astype(np.bool_)
            self._clear(index, lo, hi)
        return out

    def _take_spread(
        self, first: int, last: int, start: int, pgsize: int, npages: int
    ) -> npt.NDArray[np.bool_]:
        """Output pages smaller than a logging page: each dirty one sets a run (+1 at its
        first output page, -1 after its last; a running sum above 0 is dirty). The output
        is at most the report's bitmap, so this is bounded by the reply's size."""
        log = self.pgsize
        # At most two logging pages overlap an output page: int8 counts, one byte per page.
        edges = np.zeros(npages + 1, np.int8)
        for index, lo, hi in self._spans(first, last):
            bits = np.unpackbits(self.chunks[index], bitorder="little")[lo : hi + 1]
            dirty = np.flatnonzero(bits).astype(np.int64) + (index * CHUNK_PAGES + lo)
            if len(dirty):
                np.add.at(edges, np.maximum((dirty * log - start) // pgsize, 0), 1)
                last_out = np.minimum(((dirty + 1) * log - 1 - start) // pgsize, npages - 1)
                np.add.at(edges, last_out + 1, -1)
            self._clear(index, lo, hi)
        result: npt.NDArray[np.bool_] = np.cumsum(edges, dtype=np.int8) > 0
        return result

    def _clear(self, index: int, lo: int, hi: int) -> None:
        chunk = self.chunks[index]
        if lo == 0 and hi == CHUNK_PAGES - 1:
            del self.chunks[index]
        else:
            _set(chunk, lo, hi, False)
            if not chunk.any():
                del self.chunks[index]

    def _spans(self, first: int, last: int, *, existing: bool = True) -> list[tuple[int, int, int]]:
        """``(chunk index, first bit, last bit)`` for each chunk that pages ``first..last``
        cross: those that exist, or (``existing`` False, for `mark`) all of them."""
        lo_chunk, hi_chunk = first // CHUNK_PAGES, last // CHUNK_PAGES
        if not existing:
            indexes = list(range(lo_chunk, hi_chunk + 1))
        elif hi_chunk - lo_chunk + 1 > len(self.chunks):  # a wide range, few chunks
            indexes = sorted(i for i in self.chunks if lo_chunk <= i <= hi_chunk)
        else:
            indexes = [i for i in range(lo_chunk, hi_chunk + 1) if i in self.chunks]
        spans = []
        for index in indexes:
            base = index * CHUNK_PAGES
            spans.append((index, max(first, base) - base, min(last, base + CHUNK_PAGES - 1) - base))
        return spans


def _set(chunk: Bits, lo: int, hi: int, value: bool) -> None:
    """Set bits ``lo..hi`` of ``chunk`` to ``value``: whole bytes in one slice, the
    partial bytes at either end bit by bit (at most 14 bits)."""
    full_lo, full_hi = (lo + 7) // 8, (hi + 1) // 8  # whole bytes: [full_lo, full_hi)
    if full_lo < full_hi:
        chunk[full_lo:full_hi] = 0xFF if value else 0
        edges = [*range(lo, full_lo * 8), *range(full_hi * 8, hi + 1)]
    else:
        edges = list(range(lo, hi + 1))
    for bit in edges:
        if value:
            chunk[bit >> 3] |= 1 << (bit & 7)
        else:
            chunk[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
