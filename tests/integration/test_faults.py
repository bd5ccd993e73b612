"""Fault injection: each case ends with a clear error naming the device, idx and cause,
the sink holds exactly a prefix of the stream (never a byte out of order), and no fd or
thread is left behind. Every case is bounded in time. See RELIABILITY.md."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence

import pytest
import trio

from tests.integration.faults import (
    CONFIG,
    UUID,
    Snapshot,
    connect,
    idstr,
    receiver,
    reset,
)
from vfiomig import SessionReport
from vfiomig._core._wire import encode_packet, format_uuid
from vfiomig.control import open_control_client
from vfiomig.sinks import Chunk, FdSink
from vfiomig.testing import MemorySink, channel_streams, device_packets

STATE = bytes(range(256)) * 160  # 40 KiB, not periodic at packet boundaries
PACKET = 1000


def packets(i: int = 0, state: bytes = STATE) -> list[bytes]:
    return device_packets(idstr(i), 0, state, CONFIG, PACKET)


def assert_prefix(sink: MemorySink, state: bytes = STATE) -> None:
    assert bytes(sink.data) == state[: len(sink.data)], "sink holds bytes out of order"


@pytest.fixture
async def snapshot() -> Snapshot:
    # Taken inside the test's trio run, so that the run's own fds are not counted.
    return Snapshot.take()


async def test_channel_reset_inside_a_packet(snapshot: Snapshot) -> None:
    sink = MemorySink()
    pk = packets()
    stream = b"".join(channel_streams(pk[:5], 1, UUID)) + pk[5][:600]
    with trio.fail_after(10):
        async with receiver([sink], channels=1) as rx:
            conn = await connect(rx)
            await conn.send_all(stream)
            while rx.session.progress < 5:  # noqa: ASYNC110 - polling a test condition
                await trio.sleep(0.01)
            reset(conn)
    err = rx.failed().report.devices[0].error or ""
    assert err.startswith(f"{idstr(0)}/0: channel ") and "inside packet idx 5" in err, err
    assert_prefix(sink)
    assert "abort" in sink.calls
    snapshot.check()


async def test_half_open_channel_stalls_and_names_missing_idx(snapshot: Snapshot) -> None:
    sink = MemorySink()
    pk = packets()
    del pk[7]
    with trio.fail_after(10):
        async with receiver([sink], channels=1, stall_timeout=0.5) as rx:
            conn = await connect(rx)
            await conn.send_all(channel_streams(pk, 1, UUID)[0])
            await rx.session.done.wait()  # the peer never closes: the stall timeout ends it
            await conn.aclose()
    err = rx.failed().report.devices[0].error
    assert err == f"{idstr(0)}/0: no progress for 0.5 s: next idx 7, missing idx 7", err
    assert bytes(sink.data) == STATE[: 7 * PACKET]
    snapshot.check()


@pytest.mark.parametrize("k", [0, 1, 17, 39])
async def test_sink_eio_at_packet_k(k: int, snapshot: Snapshot) -> None:
    sink = MemorySink(fail_at=k * PACKET)
    other = MemorySink()
    with trio.fail_after(10):
        async with receiver([sink, other], channels=2, max_queued=8 * PACKET) as rx:
            for s in channel_streams(packets(0) + packets(1), 2, UUID, seed=k):
                try:
                    conn = await connect(rx)
                    await conn.send_all(s)
                    await conn.aclose()
                except (OSError, trio.BrokenResourceError):
                    pass  # the session failed and closed its listener first
    report = rx.failed().report
    err = report.devices[0].error or ""
    # The loader writes in-order runs: the message names the run that held packet k.
    m = re.match(rf"{re.escape(idstr(0))}/0: sink memory failed writing idx (\d+)\.\.(\d+): ", err)
    assert m is not None and int(m[1]) <= k <= int(m[2]), err
    assert err.endswith("Input/output error (errno 5)")
    assert bytes(sink.data) == STATE[: k * PACKET]
    assert sink.calls[-2:] == ["abort", "aclose"] and "finish" not in sink.calls
    # The other device finished or was failed by the session, never half-written.
    assert report.devices[1].loaded or other.calls[-2:] == ["abort", "aclose"]
    assert_prefix(other)
    snapshot.check()


async def test_sink_taking_one_byte_per_write(
    snapshot: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    got = bytearray()
    calls = 0

    def one_byte(fd: int, views: Sequence[memoryview]) -> int:
        nonlocal calls
        calls += 1
        return os.write(fd, bytes(views[0][:1]))

    monkeypatch.setattr(os, "writev", one_byte)  # as sinks._fd calls it
    state = STATE[:6000]

    async def drain() -> None:
        while True:
            await trio.lowlevel.wait_readable(r)
            data = os.read(r, 65536)
            if not data:
                return
            got.extend(data)

    class ListFdSink(FdSink):
        # The chunks as a list: the C core's Run is written by its own writev in C (its
        # short writes: tests/unit/test_run.py), not by the os.writev patched here.
        async def write(self, chunks: Sequence[Chunk]) -> None:
            await super().write(list(chunks))

    sink = ListFdSink(w, owned=True, description="pipe")
    sink.writes_nowait = False  # every batch through write(), the path under test
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            async with receiver([sink], channels=1) as rx:
                conn = await connect(rx)
                await conn.send_all(channel_streams(packets(0, state), 1, UUID)[0])
                await conn.aclose()
    os.close(r)
    assert isinstance(rx.outcome[0], SessionReport), str(rx.outcome[0])
    assert bytes(got) == state and calls == len(state)
    snapshot.check()


class SlowSink(MemorySink):
    """Each write takes ``delay`` seconds (a device loading its state slowly)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def write(self, chunks: Sequence[Chunk]) -> None:
        await trio.sleep(self.delay)
        await super().write(chunks)


async def test_very_slow_sink_is_not_a_stall(snapshot: Snapshot) -> None:
    # Each write takes longer than the stall timeout: the loader is busy, which is progress.
    # Both channels are connected before either sends: one that ended while the other had
    # not come yet would start the late-channel grace (the stall timeout, at most).
    sink = SlowSink(1.2)
    with trio.fail_after(30):
        async with receiver([sink], channels=2, stall_timeout=1.0, max_queued=4 * PACKET) as rx:
            streams = channel_streams(packets(0, STATE[:8000]), 2, UUID, seed=1)
            conns = [await connect(rx) for _ in streams]
            for conn, s in zip(conns, streams, strict=True):
                await conn.send_all(s)
                await conn.aclose()
    assert isinstance(rx.outcome[0], SessionReport), str(rx.outcome[0])
    assert bytes(sink.data) == STATE[:8000]
    snapshot.check()


async def test_control_channel_drop_leaves_the_gate_closed(tmp_path, snapshot: Snapshot) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.control_helpers import running_receiver

    sink = MemorySink()
    with trio.fail_after(10):
        async with running_receiver(
            tmp_path, [(idstr(0), 0, sink)], channels=1, stall_timeout=0.5
        ) as rx:
            async with open_control_client(rx.control_address) as client:
                await client.hello()
                await client.precopy(idstr(0), 0, b"PRE")
            # The control channel dropped before switchover.
            host, port = rx.data_address[4:].rsplit(":", 1)
            conn = await trio.open_tcp_stream(host, int(port))
            await conn.send_all(channel_streams(packets(), 1, UUID)[0])
            await rx.session.done.wait()
            await conn.aclose()
    exc = rx.outcome[0]
    err = exc.report.devices[0].error  # type: ignore[union-attr]
    assert err == (
        f"{idstr(0)}/0: no progress for 0.5 s: every packet received, waiting for its gate"
        " (data-complete or switchover-start)"
    )
    assert bytes(sink.data) == b"PRE"  # no multifd byte behind a closed gate
    snapshot.check()


async def test_abort_half_way(tmp_path, snapshot: Snapshot) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.control_helpers import running_receiver

    sink = MemorySink()
    with trio.fail_after(10):
        async with (
            running_receiver(tmp_path, [(idstr(0), 0, sink)], channels=1) as rx,
            open_control_client(rx.control_address) as client,
        ):
            await client.hello()
            await client.switchover_start()
            host, port = rx.data_address[4:].rsplit(":", 1)
            conn = await trio.open_tcp_stream(host, int(port))
            pk = packets()
            await conn.send_all(b"".join(channel_streams(pk[:20], 1, UUID)))
            while len(sink.data) < 20 * PACKET:  # noqa: ASYNC110 - polling a test condition
                await trio.sleep(0.01)
            await client.abort("operator cancelled")
            await rx.session.done.wait()
            await conn.aclose()
    err = rx.outcome[0].report.devices[0].error  # type: ignore[union-attr]
    assert err == f"{idstr(0)}/0: migration aborted: operator cancelled"
    assert bytes(sink.data) == STATE[: 20 * PACKET]
    assert sink.calls[-2:] == ["abort", "aclose"]
    snapshot.check()


async def test_sender_process_killed(snapshot: Snapshot) -> None:
    sink = MemorySink()
    with trio.fail_after(30):
        async with receiver([sink], channels=2, stall_timeout=5) as rx:
            host, port = rx.address
            argv = [
                sys.executable, "-m", "vfiomig", "send", "--channels", "2",
                "--connect", f"tcp:{host}:{port}", "--uuid", format_uuid(UUID),
                "--device", f"{idstr(0)}/0=synth:8MiB:3", "--packet-size", "4096",
                "--channel-rate", "256KiB",
            ]  # fmt: skip
            proc = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
            try:
                while len(sink.data) < 64 * 1024:  # noqa: ASYNC110 - polling a test condition
                    await trio.sleep(0.02)
            finally:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
    err = rx.failed().report.devices[0].error or ""
    assert err.startswith(f"{idstr(0)}/0: "), err
    # Killed inside a packet, or between two: the channel's end is reported either way.
    assert any(
        w in err for w in ("inside packet idx", "missing idx", "config packet not received")
    ), err
    from vfiomig.testing import synth_bytes

    assert bytes(sink.data) == synth_bytes(len(sink.data), 3)
    assert "abort" in sink.calls
    snapshot.check()


async def test_second_config_while_the_sink_finishes(snapshot: Snapshot) -> None:
    # The device's last data is written and its sink is in finish() when a second config
    # packet arrives on another channel: the device must fail (not be reported loaded),
    # with the packet's error, and the session end cleanly.
    finishing, release = trio.Event(), trio.Event()

    class SlowFinish(MemorySink):
        async def finish(self) -> None:
            finishing.set()
            with trio.CancelScope(shield=True):  # as a driver that validates to the end
                await release.wait()
            await super().finish()

    sink = SlowFinish()
    second = encode_packet(idstr(0), 0, 0xFFFF, 1, CONFIG)
    with trio.fail_after(10):
        async with receiver([sink], channels=2) as rx:
            streams = channel_streams(packets(), 2, UUID)
            first, late = await connect(rx), await connect(rx)
            await first.send_all(streams[0])
            await late.send_all(streams[1])
            await finishing.wait()
            await late.send_all(second)
            while not rx.session.failed:  # noqa: ASYNC110 - polling a test condition
                await trio.sleep(0.01)
            release.set()
            await first.aclose()
            await late.aclose()
    report = rx.failed().report
    err = report.devices[0].error or ""
    assert err == f"{idstr(0)}/0: second config packet idx 65535 (first was idx 41)", err
    assert not report.devices[0].loaded
    assert bytes(sink.data) == STATE and "finish" in sink.calls
    snapshot.check()
