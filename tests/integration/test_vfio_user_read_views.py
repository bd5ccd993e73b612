"""`VfioUserSource.read` hands out views of the buffers MIG_DATA_READ replies were received
in: a view stays valid however long it is kept (its buffer is not reused until it goes),
and buffers whose views are gone are reused (memory stays bounded)."""

from __future__ import annotations

import random

import trio

from tests.vfio_user_raw import serving
from vfiomig.vfio_user import MigState, VfioUserDevice, VfioUserSource
from vfiomig.vfio_user.client._read_pipeline import ARENA_REPLIES, ReadPipeline

LIMIT = 64 * 1024
REPLIES = 12 * ARENA_REPLIES  # a dozen arenas' worth


class Stream:
    """A device whose STOP_COPY stream is ``data``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0
        self.device = VfioUserDevice(migration=self, max_data_xfer_size=LIMIT)

    def transition(self, state: MigState) -> None:
        pass

    def read_data(self, size: int) -> bytes:
        chunk = self.data[self.at : self.at + size]
        self.at += len(chunk)
        return chunk

    def write_data(self, data: memoryview) -> int:
        return 0


def reader_of(source: VfioUserSource) -> ReadPipeline:
    reader = source.client._reader
    assert reader is not None
    return reader


async def read_all(
    keep: int, packet: int = LIMIT
) -> tuple[bytes, list[tuple[int, bytes | bytearray | memoryview]], int]:
    """Read a stream of `REPLIES` replies; keep every ``keep``-th piece as it came.
    Returns (the stream, the kept (offset, piece) pairs, arenas allocated)."""
    data = random.Random(keep).randbytes(REPLIES * LIMIT - 1000)
    stream = Stream(data)
    kept: list[tuple[int, bytes | bytearray | memoryview]] = []
    with trio.fail_after(20):
        async with serving(stream.device) as path:
            source = VfioUserSource(path, reply_timeout=5)
            await source.start()
            offset = 0
            n = 0
            while piece := await source.read(packet):
                if n % keep == 0:
                    kept.append((offset, piece))
                offset += len(piece)
                n += 1
            assert offset == len(data)
            arenas = reader_of(source).arenas
            await source.finish()
            await source.aclose()
    return data, kept, arenas


async def test_views_kept_by_the_caller_are_never_overwritten() -> None:
    data, kept, arenas = await read_all(keep=1)
    assert all(isinstance(p, memoryview) and p.readonly for _, p in kept)  # no copies
    got = b"".join(bytes(p) for _, p in kept)
    assert got == data
    assert arenas >= 12  # every arena was still viewed: none could be reused


async def test_some_views_kept_the_rest_reused() -> None:
    data, kept, arenas = await read_all(keep=3 * ARENA_REPLIES)
    for offset, piece in kept:
        assert bytes(piece) == data[offset : offset + len(piece)]
    assert arenas < 12  # arenas whose views all went were reused


async def test_views_dropped_at_once_keep_memory_bounded() -> None:
    _, kept, arenas = await read_all(keep=REPLIES * 2)  # keeps only the first piece
    assert len(kept) == 1
    assert arenas <= 4  # the current one, the first (still viewed), and a spare or two


async def test_pieces_smaller_than_a_reply_are_views_too() -> None:
    data, kept, _ = await read_all(keep=1, packet=LIMIT // 4)
    assert all(isinstance(p, memoryview) for _, p in kept)
    assert b"".join(bytes(p) for _, p in kept) == data


async def test_pieces_across_replies_are_joined() -> None:
    data, kept, _ = await read_all(keep=1, packet=LIMIT // 3)
    assert any(isinstance(p, bytes) for _, p in kept)  # 64 KiB is no multiple of a third
    assert b"".join(bytes(p) for _, p in kept) == data
