"""The fd sinks on real pipes and files, and the library's callback sink and config."""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time

import pytest
import trio
import trio.lowlevel
import trio.testing

from tests.integration.sink_helpers import UUID, failed_migration, migrate, serve_ignoring_failure
from vfiomig import CallbackConfig, CallbackSink, DeviceSetup, ReceiverConfig, send_migration
from vfiomig._core import SinkError
from vfiomig.receive import Session
from vfiomig.send import SendDevice
from vfiomig.sinks._fd import (
    ConfigDir,
    FdSink,
    NullSink,
    open_fd_sink,
    open_file_sink,
    write_all,
)
from vfiomig.sources import SynthSource
from vfiomig.testing import (
    MemoryConfig,
    channel_streams,
    device_packets,
    synth_bytes,
    synth_config,
)

F_SETPIPE_SZ = 1031


def drain_in_thread(
    fd: int, out: bytearray, step: int = 65536, delay: float = 0.0
) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        while chunk := os.read(fd, step):
            out.extend(chunk)
        os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("nonblocking", [False, True])
async def test_fd_sink_on_a_small_pipe_loops_on_short_writes(nonblocking: bool) -> None:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)  # every large write is short or EAGAIN
    if nonblocking:
        os.set_blocking(w, False)
    got = bytearray()
    t = drain_in_thread(r, got, step=1000)
    sink = FdSink(w, owned=True)
    chunks = [os.urandom(n) for n in (1, 70_000, 0, 12_345, 300_000)]
    with trio.fail_after(20):
        await sink.write(chunks)
        await sink.write([memoryview(b"tail")])
        await sink.aclose()
    t.join(10)
    assert bytes(got) == b"".join(chunks) + b"tail"
    assert sink.bytes_written == len(got)


async def test_fd_sink_epipe_is_a_clear_error() -> None:
    r, w = os.pipe()
    os.close(r)
    sink = FdSink(w, owned=True, description="fd:pipe")
    with trio.fail_after(10), pytest.raises(BrokenPipeError):
        await sink.write([b"x" * 100])
    await sink.aclose()


async def test_epipe_through_the_loader_names_device_idx_and_errno() -> None:
    r, w = os.pipe()
    os.close(r)
    sink = FdSink(w, owned=True, description="fd:7")
    err = await failed_migration(sink, size=10_000, packet_size=4096)
    assert err is not None
    assert err.startswith("d/0: sink fd:7 failed writing idx 0..")
    assert err.endswith("Broken pipe (errno 32)")


async def test_file_sink_truncates_and_config_dir_is_atomic(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "out"
    path.write_bytes(b"old contents that must go")
    sink = open_file_sink(str(path))
    await sink.write([b"new"])
    await sink.aclose()
    assert path.read_bytes() == b"new"
    target = ConfigDir(str(tmp_path), "0000:00:04.0/vfio", 2)
    await target.load_config(b"blob")
    assert (tmp_path / "0000:00:04.0_vfio.2.config").read_bytes() == b"blob"
    assert not list(tmp_path.glob("*.part"))


def test_fd_sink_spec_checks_the_descriptor() -> None:
    from vfiomig._core import UsageError

    with pytest.raises(UsageError, match="sink fd:x needs a descriptor number"):
        open_fd_sink("x")
    with pytest.raises(UsageError, match="sink fd:987654 is not an open descriptor"):
        open_fd_sink("987654")
    with pytest.raises(SinkError, match="cannot open sink file"):
        open_file_sink("/nonexistent/dir/file")


def test_write_all_handles_empty_chunks() -> None:
    r, w = os.pipe()
    try:
        assert write_all(w, [b"", b"ab", memoryview(b""), bytearray(b"c")]) == 3
        assert os.read(r, 10) == b"abc"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_callback_sink_and_config_in_the_library(asynchronous: bool) -> None:
    received = bytearray()
    configs: list[bytes] = []
    if asynchronous:

        async def write(view: memoryview) -> None:
            received.extend(view)
            await trio.lowlevel.checkpoint()

        async def load(data: bytes) -> None:
            configs.append(data)
    else:

        def write(view: memoryview) -> None:  # type: ignore[misc]
            received.extend(view)

        def load(data: bytes) -> None:  # type: ignore[misc]
            configs.append(data)

    setup = DeviceSetup("emu", 1, CallbackSink(write), CallbackConfig(load))
    config = ReceiverConfig(uuid=UUID, channels=3, devices=[setup])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            session: Session = await nursery.start(serve_ignoring_failure, config)
            await send_migration(
                connect_to=session.bound,
                channels=3,
                uuid=UUID,
                devices=[SendDevice("emu", 1, SynthSource(200_000, 3))],
                packet_size=8192,
                order="random",
            )
    assert bytes(received) == synth_bytes(200_000, 3)
    assert configs == [synth_config(3)]
    assert session.report().ok


async def test_a_sink_that_stops_reading_fails_within_the_sink_timeout() -> None:
    """A blocking pipe whose reader never reads: the loader's wait is cancellable."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 65536)
    sink = FdSink(w, owned=True, description="fd:stuck")
    try:
        err = await failed_migration(sink, size=1_000_000, packet_size=65536, sink_timeout=0.5)
    finally:
        os.close(r)
    assert err is not None
    assert re.fullmatch(
        r"d/0: sink fd:stuck did not finish writing idx \d+\.\.\d+ within 0\.5 s", err
    ), err


class _CountingFdSink(FdSink):
    """An `FdSink` that counts which way each batch went."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, owned=True, description="fd:pipe")
        self.nowait_done = 0
        self.nowait_full = 0
        self.writes = 0

    def write_nowait(self, chunks):  # type: ignore[no-untyped-def]
        done = super().write_nowait(chunks)
        if done:
            self.nowait_done += 1
        else:
            self.nowait_full += 1
        return done

    async def write(self, chunks):  # type: ignore[no-untyped-def]
        self.writes += 1
        await super().write(chunks)


async def test_nowait_writes_hand_a_full_pipe_to_the_loader() -> None:
    """A non-blocking pipe sink is written from the channel tasks; a batch the pipe has no
    room for is finished by the loader, from where it stopped, and the stream arrives whole
    and in order."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 65536)
    os.set_blocking(w, False)
    got = bytearray()
    t = drain_in_thread(r, got, step=1000, delay=0.3)  # the pipe fills first
    sink = _CountingFdSink(w)
    size = 600_000
    # Paced, so that packets trickle in while the loader is parked (the channel tasks then
    # write): an unpaced sender can deliver the whole state before the first batch.
    session = await migrate(sink, size=size, packet_size=5000, channels=2, seed=3, channel_rate=2e6)
    t.join(10)
    report = session.report()
    assert report.ok, report
    assert bytes(got) == synth_bytes(size, 3)
    assert sink.bytes_written == size
    if sink.writes_nowait:  # the C core: batches are runs that keep their cursor
        assert sink.nowait_done and sink.nowait_full, vars(sink)
        assert sink.writes >= sink.nowait_full  # each unfinished batch went to the loader
    else:  # the pure core's lists go through write() only
        assert sink.nowait_done == sink.nowait_full == 0 and sink.writes


async def test_epipe_in_a_nowait_write_names_device_idx_and_errno() -> None:
    r, w = os.pipe()
    os.close(r)
    os.set_blocking(w, False)
    sink = _CountingFdSink(w)
    err = await failed_migration(sink, size=10_000, packet_size=4096)
    assert err is not None
    assert err.startswith("d/0: sink fd:pipe failed writing idx 0..")
    assert err.endswith("Broken pipe (errno 32)")
    assert sink.writes == 0 if sink.writes_nowait else sink.writes == 1


async def test_starved_time_counts_the_waits_between_nowait_batches(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A null sink is written from the channel task; the loader's starved time still counts
    how long the stream waited for its next idx (on trio's test clock: the wait is exactly
    the test's sleep, whatever the host's load)."""
    state = synth_bytes(40_000, 1)
    pk = device_packets("d", 0, state, synth_config(0), 4000)
    first, rest = channel_streams(pk[:5], 1, UUID)[0], b"".join(pk[5:])
    setup = DeviceSetup("d", 0, NullSink(), MemoryConfig())
    cfg = ReceiverConfig(uuid=UUID, channels=1, devices=[setup])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            session: Session = await nursery.start(serve_ignoring_failure, cfg)
            host, port = session.bound[0][4:].rsplit(":", 1)
            conn = await trio.open_tcp_stream(host, int(port))
            await conn.send_all(first)
            while session.devices["d", 0].buf.next_idx < 5:  # noqa: ASYNC110 - test clock
                await trio.sleep(0.01)
            await trio.sleep(0.3)
            await conn.send_all(rest)
            await conn.aclose()
    row = session.report().devices[0]
    assert row.loaded, row
    assert 0.3 <= row.starved_seconds < 0.4, row
