"""The C core's Run: a take_ready batch held in place, as chunks or written from C.

Receive blocks and their budget are tests/unit/test_blocks.py's (a Run there pins them);
here the Run itself: its sequence, its cursor across short writes, release, the PipeWriter
and the fd and null sinks taking it whole.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select

import pytest
import trio

import vfiomig._core as core
from vfiomig._core import Run
from vfiomig.sinks import FdSink, NullSink

pytestmark = pytest.mark.skipif(core.IMPLEMENTATION != "native", reason="no native core")

PACKETS: list[bytes | bytearray | memoryview] = [
    b"a" * 70000,
    b"",
    bytearray(b"b" * 3000),
    memoryview(b"c" * 5),
    b"d" * 200000,
]
STREAM = b"".join(bytes(p) for p in PACKETS)


def _run() -> Run:
    buf = core.ReorderBuffer("dev/0", core.Budget(1 << 30))
    buf.open_gate()
    for i, p in enumerate(PACKETS):
        assert buf.offer(0, i, 0, len(p))
        buf.deliver(i, p)
    ready = buf.take_ready()
    assert ready is not None and ready.nbytes == len(STREAM)
    assert (ready.first_idx, ready.end_idx) == (0, len(PACKETS))
    run = ready.chunks
    assert isinstance(run, Run)
    return run


def test_a_run_is_the_sequence_of_its_chunks() -> None:
    run = _run()
    assert type(run).__name__ == "Run"
    chunks = [p for p in PACKETS if len(p)]  # zero-length packets are never written
    assert len(run) == len(chunks)
    assert [bytes(c) for c in run] == [bytes(c) for c in chunks]
    assert run[0] is PACKETS[0] and bytes(run[-1]) == bytes(chunks[-1])
    assert [bytes(c) for c in run[1:3]] == [b"b" * 3000, b"c" * 5]
    with pytest.raises(IndexError):
        run[len(chunks)]
    assert run.nbytes == run.remaining == len(STREAM)


def test_write_to_carries_on_across_short_writes() -> None:
    run = _run()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        out = bytearray()
        writes = 0
        while run.remaining:
            try:
                n = run.write_to(w)
                assert 0 < n <= 4096
                writes += 1
            except BlockingIOError:
                pass
            out += os.read(r, 1 << 16)
        assert bytes(out) == STREAM and writes > 60
        assert run.write_to(w) == 0  # nothing left
    finally:
        os.close(r)
        os.close(w)


def test_write_errors_and_release() -> None:
    run = _run()
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(OSError) as info:
        run.write_to(w)
    assert info.value.errno == errno.EBADF
    os.close(r)
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):
        run.write_to(w)
    os.close(w)
    assert run.remaining == len(STREAM)  # nothing was written
    run.release()
    run.release()  # idempotent
    assert run.released and run.remaining == 0 and len(run) == 0
    for call in (lambda: run[0], lambda: run.write_to(1)):
        with pytest.raises(ValueError, match="released"):
            call()


def test_deliver_takes_only_bytes_like_objects() -> None:
    buf = core.ReorderBuffer("dev/0", core.Budget(1 << 20))
    assert buf.offer(0, 0, 0, 2)
    with pytest.raises(TypeError, match="bytes-like"):
        buf.deliver(0, [1, 2])  # type: ignore[arg-type]


def test_the_pipe_writer_writes_a_run_whole_and_keeps_it_pinned() -> None:
    from vfiomig._native import PipeWriter

    run = _run()
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    writer = PipeWriter(w)
    out = bytearray()
    try:
        writer.submit(run)
        with pytest.raises(ValueError, match="being written"):
            run.release()
        n = None
        while n is None:
            readable, _, _ = select.select([r, writer.done_fd], [], [], 10)
            if r in readable:
                out += os.read(r, 1 << 16)
            if writer.done_fd in readable:
                n = writer.result()
        assert n == len(STREAM)
        run.release()  # free again once the batch is done
    finally:
        writer.close()
        os.close(w)
    while chunk := os.read(r, 1 << 16):
        out += chunk
    os.close(r)
    assert bytes(out) == STREAM


@pytest.mark.parametrize("kind", ["file", "nonblocking-pipe", "null"])
def test_sinks_write_a_run_from_c(tmp_path: object, kind: str) -> None:
    run = _run()

    async def main() -> bytes:
        if kind == "null":
            null = NullSink()
            await null.write(run)
            return STREAM[: null.bytes_written]
        if kind == "file":
            path = os.path.join(str(tmp_path), "out")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            sink = FdSink(fd, owned=True)
            await sink.write(run)
            await sink.aclose()
            return await trio.Path(path).read_bytes()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        sink = FdSink(w, owned=True)
        out = bytearray()

        async def drain() -> None:
            while len(out) < len(STREAM):
                await trio.lowlevel.wait_readable(r)
                out.extend(os.read(r, 1 << 16))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await sink.write(run)
        await sink.aclose()
        os.close(r)
        assert sink.bytes_written == len(STREAM)
        return bytes(out)

    assert trio.run(main) == STREAM
