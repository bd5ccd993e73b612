"""The C core's PipeWriter: the fd sink's writer thread for blocking pipes."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import threading
import time

import pytest

import vfiomig._core as core

pytestmark = pytest.mark.skipif(core.IMPLEMENTATION != "native", reason="no native core")


def _wait(writer: object) -> int:
    while True:
        select.select([writer.done_fd], [], [], 10)  # type: ignore[attr-defined]
        n = writer.result()  # type: ignore[attr-defined]
        if n is not None:
            return int(n)


def _drain(rfd: int, out: bytearray) -> None:
    while chunk := os.read(rfd, 1 << 16):
        out += chunk


def test_batches_arrive_whole_and_in_order() -> None:
    from vfiomig._native import PipeWriter

    rfd, wfd = os.pipe()
    fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 4096)  # far smaller than a batch: short writes
    got = bytearray()
    reader = threading.Thread(target=_drain, args=(rfd, got))
    reader.start()
    writer = PipeWriter(wfd)
    expected = bytearray()
    try:
        for i in range(20):
            chunks: list[bytes | bytearray | memoryview] = [
                bytes([i]) * 70000,
                b"",
                bytearray(b"x" * (i * 311)),
                memoryview(b"yz"),
            ]
            writer.submit(chunks)
            with pytest.raises(RuntimeError, match="in flight"):
                writer.submit([b"no"])
            assert _wait(writer) == sum(len(c) for c in chunks)
            expected += b"".join(bytes(c) for c in chunks)
        writer.submit([])
        assert _wait(writer) == 0
    finally:
        writer.close()
        os.close(wfd)
        reader.join(10)
        os.close(rfd)
    assert got == expected


def test_a_closed_reader_is_epipe() -> None:
    from vfiomig._native import PipeWriter

    rfd, wfd = os.pipe()
    os.close(rfd)
    writer = PipeWriter(wfd)
    try:
        writer.submit([b"a" * 100])
        with pytest.raises(OSError) as e:
            _wait(writer)
        assert e.value.errno == errno.EPIPE
        writer.submit([b"again"])  # still usable; the caller decides
        with pytest.raises(BrokenPipeError):
            _wait(writer)
    finally:
        writer.close()
        os.close(wfd)


def test_close_stops_a_writer_blocked_on_a_full_pipe() -> None:
    from vfiomig._native import PipeWriter

    rfd, wfd = os.pipe()
    writer = PipeWriter(wfd)
    data = bytearray(4 << 20)
    writer.submit([data])
    time.sleep(0.05)
    assert writer.result() is None  # the reader never reads: still writing
    with pytest.raises(BufferError):
        data.extend(b"x")  # the chunk is pinned while the thread may write it
    t0 = time.monotonic()
    writer.close()
    assert time.monotonic() - t0 < 1.0
    data.extend(b"x")  # released
    os.fstat(wfd)  # the fd is left to its owner
    with pytest.raises(ValueError, match="closed"):
        writer.submit([b"x"])
    writer.close()  # idempotent
    os.close(wfd)
    os.close(rfd)


def test_not_a_pipe_and_bad_chunks() -> None:
    from vfiomig._native import PipeWriter

    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            PipeWriter(fd)
    finally:
        os.close(fd)
    rfd, wfd = os.pipe()
    writer = PipeWriter(wfd)
    try:
        with pytest.raises(TypeError):
            writer.submit([b"ok", 3])  # type: ignore[list-item]  # what the type forbids
        assert not writer.busy
        with pytest.raises(RuntimeError, match="without a batch"):
            writer.result()
    finally:
        writer.close()
        os.close(wfd)
        os.close(rfd)
