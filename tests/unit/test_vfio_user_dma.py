"""`Dma` without a socket: mapping rules, translation, views and dirty bitmaps."""

from __future__ import annotations

import errno
import mmap
import os
import random
import tempfile

import pytest

from vfiomig.vfio_user import Dma
from vfiomig.vfio_user._layouts import DMA_FLAG_READ, DMA_FLAG_WRITE, bitmap_size
from vfiomig.vfio_user.server import _dma
from vfiomig.vfio_user.server._dirty import CHUNK_BYTES, CHUNK_PAGES, DirtyLog
from vfiomig.vfio_user.server._dma import MAX_REGION_SIZE

PAGE = mmap.PAGESIZE
RW = DMA_FLAG_READ | DMA_FLAG_WRITE


def memfd(size: int) -> int:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


def test_bitmap_size_is_whole_u64_words_like_libvfio_user() -> None:
    assert bitmap_size(PAGE, PAGE) == 8
    assert bitmap_size(64 * PAGE, PAGE) == 8
    assert bitmap_size(65 * PAGE, PAGE) == 16


def test_translate_spans_adjacent_regions_and_checks_access() -> None:
    dma = Dma()
    dma.map(0x1000, PAGE, 0, RW, None)
    dma.map(0x2000, PAGE, 0, DMA_FLAG_READ, None)
    first, second = dma.translate(0x1800, PAGE)
    assert (first.iova, first.length, second.iova, second.length) == (0x1800, 0x800, 0x2000, 0x800)
    with pytest.raises(OSError) as exc:
        dma.translate(0x1800, PAGE, write=True)
    assert exc.value.errno == errno.EACCES
    with pytest.raises(OSError) as exc:
        dma.translate(0x2800, PAGE)
    assert exc.value.errno == errno.ENOENT


def test_region_limit_and_views_outliving_an_unmap() -> None:
    dma = Dma(max_regions=1)
    fd = memfd(PAGE)
    region = dma.map(0, PAGE, 0, RW, fd)
    os.close(fd)
    with pytest.raises(OSError) as exc:
        dma.map(PAGE, PAGE, 0, RW, None)
    assert exc.value.errno == errno.ENOSPC
    (sg,) = dma.translate(0, 8, write=True)
    view = dma.get(sg)
    dma.unmap(region)  # the client unmaps while the emulator holds a view
    view[:2] = b"ok"  # still valid memory: the mapping goes with the last view
    view.release()
    with pytest.raises(OSError):
        dma.get(sg)


@pytest.mark.parametrize(
    ("pgsize", "expected"),
    [
        (PAGE, [0b00000110]),  # pages 1 and 2
        (2 * PAGE, [0b00000011]),  # combined: 2-page units 0 and 1
        (PAGE // 2, [0b00111100]),  # extended: each page is two half pages
    ],
)
def test_dirty_bitmap_in_other_page_sizes(pgsize: int, expected: list[int]) -> None:
    dma = Dma()
    fd = memfd(8 * PAGE)
    dma.map(0, 8 * PAGE, 0, RW, fd)
    os.close(fd)
    dma.logging_start(PAGE, [])
    dma.mark_dirty(dma.translate(PAGE + 10, PAGE))  # touches pages 1 and 2
    size = bitmap_size(4 * PAGE, pgsize)
    bitmap = dma.dirty_bitmap(0, 4 * PAGE, pgsize, size)
    assert list(bitmap[: len(expected)]) == expected
    assert dma.dirty_bitmap(0, 4 * PAGE, pgsize, size) == bytes(size)  # reported: clean


def test_logging_off_or_stopped_reports_einval() -> None:
    dma = Dma()
    fd = memfd(PAGE)
    dma.map(0, PAGE, 0, RW, fd)
    os.close(fd)
    with pytest.raises(OSError):
        dma.dirty_bitmap(0, PAGE, PAGE, 8)
    dma.logging_start(PAGE, [(0, PAGE)])
    dma.logging_stop()
    with pytest.raises(OSError):
        dma.dirty_bitmap(0, PAGE, PAGE, 8)


def reference_bitmap(dirty: set[int], log: int, start: int, length: int, pgsize: int) -> bytes:
    """The old bit-by-bit answer: output page k is dirty if a dirty logging page overlaps it."""
    out = bytearray(bitmap_size(length, pgsize))
    for k in range(length // pgsize):
        lo, hi = (start + k * pgsize) // log, (start + (k + 1) * pgsize - 1) // log
        if any(p in dirty for p in range(lo, hi + 1)):
            out[k >> 3] |= 1 << (k & 7)
    return bytes(out)


@pytest.mark.parametrize("seed", range(100))
def test_dirty_log_matches_the_bit_by_bit_reference(seed: int) -> None:
    rng = random.Random(seed)
    log = PAGE << rng.randrange(3)
    size = rng.choice([64, 300, CHUNK_PAGES + 100, 3 * CHUNK_PAGES]) * log
    dirty_log = DirtyLog(size, log)
    dirty: set[int] = set()
    for _ in range(rng.randrange(1, 30)):
        start = rng.randrange(size)
        length = rng.randrange(1, min(size - start, rng.choice([10, 1000, 40 * log])) + 1)
        dirty_log.mark(start, length)
        dirty.update(range(start // log, (start + length - 1) // log + 1))
    sizes = [512, PAGE // 2, PAGE, 2 * PAGE, 4 * PAGE, 16 * PAGE, 64 * PAGE]
    pgsize = rng.choice([p for p in sizes if size // p >= 2])
    npages = rng.randrange(1, min(size // pgsize - 1, 5000) + 1)
    start = rng.randrange(size // pgsize - npages) * pgsize
    start += rng.choice([0, PAGE, 3 * PAGE]) * (start + npages * pgsize + 3 * PAGE <= size)
    length = npages * pgsize  # a region not aligned to pgsize: start is not either
    expected = reference_bitmap(dirty, log, start, length, pgsize)
    assert dirty_log.take(start, length, pgsize) == expected
    cleared = set(range(start // log, (start + length - 1) // log + 1))
    rest = bytearray(bitmap_size(size, log))
    for page in dirty - cleared:
        rest[page >> 3] |= 1 << (page & 7)
    assert dirty_log.take(0, size, log) == rest  # what was reported is clean
    assert dirty_log.chunks == {}  # and a clean log holds no memory


def test_logging_allocates_only_where_the_emulator_writes() -> None:
    """DMA_LOGGING_START over 64 regions of 8 TiB without fds, and one with: nothing
    allocated; a report over 8 TiB in 1 TiB pages visits only what was dirtied."""
    dma = Dma()
    for i in range(63):
        dma.map(i * MAX_REGION_SIZE, MAX_REGION_SIZE, 0, RW, None)
    fd = memfd(MAX_REGION_SIZE)  # sparse: costs nothing until touched
    base = 63 * MAX_REGION_SIZE
    big = dma.map(base, MAX_REGION_SIZE, 0, RW, fd)
    os.close(fd)
    dma.logging_start(PAGE, [])
    assert all(r.dirty is None for r in dma.regions if r is not big)
    assert big.dirty is not None and big.dirty.nbytes == 0
    (sg,) = dma.translate(base + 5 * (1 << 40) + 123, 2 * PAGE, write=True)
    dma.mark_dirty([sg])
    assert big.dirty.nbytes == CHUNK_BYTES
    report = dma.dirty_bitmap(base, MAX_REGION_SIZE, 1 << 40, 8)
    assert report == bytes([1 << 5]) + bytes(7)
    assert big.dirty.nbytes == 0
    with pytest.raises(OSError) as exc:
        dma.dirty_bitmap(0, MAX_REGION_SIZE, 1 << 40, 8)  # no fd: the server never writes it
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        dma.logging_start(2 * PAGE, [])  # another page size while logging
    dma.logging_start(PAGE, [])  # the same: nothing changes


def test_logging_ranges_must_lie_in_mapped_regions_adjacent_ones_joined() -> None:
    dma = Dma()
    for iova in (0x1000, 0x2000, 0x4000):
        dma.map(iova, PAGE, 0, RW, None)
    dma.logging_start(PAGE, [(0x1000, 2 * PAGE), (0x4000, PAGE), (0x1800, 0x1000)])
    dma.logging_stop()
    for bad in [(0x1000, 2 * PAGE + 1), (0x3000, 1), (0, PAGE), (0x1800, 0), ((1 << 64) - 1, 5)]:
        with pytest.raises(OSError) as exc:
            dma.logging_start(PAGE, [(0x1000, PAGE), bad])
        assert exc.value.errno == errno.EINVAL
    assert dma.log_pgsize == 0


def test_guest_memory_on_a_network_or_fuse_filesystem_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A page fault on FUSE or NFS waits on another process or the network: the client
    could stall the server at its first DMA. memfd and tmpfs are what VMMs use."""
    fd = memfd(PAGE)
    assert _dma._filesystem(fd) == ""  # a memfd: the kernel's internal mount
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as shm:
        assert _dma._filesystem(shm.fileno()) == "tmpfs"
    for kind in ("fuse.sshfs", "nfs4", "fuseblk"):
        monkeypatch.setattr(_dma, "_filesystem", lambda _fd, kind=kind: kind)
        with pytest.raises(OSError, match=f"on a {kind} filesystem") as exc:
            Dma().map(0, PAGE, 0, RW, fd)
        assert exc.value.errno == errno.EINVAL
    os.close(fd)
