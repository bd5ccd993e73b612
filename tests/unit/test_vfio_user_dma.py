"""`Dma` without a socket: mapping rules, translation, views and dirty bitmaps."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from vfiomig.vfio_user import Dma
from vfiomig.vfio_user._layouts import DMA_FLAG_READ, DMA_FLAG_WRITE, bitmap_size

PAGE = mmap.PAGESIZE
RW = DMA_FLAG_READ | DMA_FLAG_WRITE


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
    fd = os.memfd_create("guest")
    os.ftruncate(fd, PAGE)
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
    dma.map(0, 8 * PAGE, 0, RW, None)
    dma.logging_start(PAGE, [])
    dma.mark_dirty(dma.translate(PAGE + 10, PAGE))  # touches pages 1 and 2
    size = bitmap_size(4 * PAGE, pgsize)
    bitmap = dma.dirty_bitmap(0, 4 * PAGE, pgsize, size)
    assert list(bitmap[: len(expected)]) == expected
    assert dma.dirty_bitmap(0, 4 * PAGE, pgsize, size) == bytes(size)  # reported: clean


def test_logging_off_or_stopped_reports_einval() -> None:
    dma = Dma()
    dma.map(0, PAGE, 0, RW, None)
    with pytest.raises(OSError):
        dma.dirty_bitmap(0, PAGE, PAGE, 8)
    dma.logging_start(PAGE, [(0, PAGE)])
    dma.logging_stop()
    with pytest.raises(OSError):
        dma.dirty_bitmap(0, PAGE, PAGE, 8)
