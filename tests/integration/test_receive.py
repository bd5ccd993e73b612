"""The receive service on loopback, driven by the library sender or by raw streams."""

from __future__ import annotations

import os
import re

import pytest
import trio

import vfiomig.receive._channels as channels_module
import vfiomig.receive._loader as loader_module
from vfiomig import (
    DeviceSetup,
    MigrationFailed,
    ReceiverConfig,
    SendDevice,
    send_migration,
    serve_receiver,
)
from vfiomig._core._wire import VFIO_FLAG_CONFIG_STATE, encode_packet
from vfiomig.receive import Session, SessionReport
from vfiomig.send import SendError
from vfiomig.sources import SynthSource
from vfiomig.testing import (
    MemoryConfig,
    MemorySink,
    channel_streams,
    device_packets,
    synth_bytes,
    synth_config,
)

UUID = bytes(range(16))


async def open_channel(session: Session) -> trio.SocketStream:
    host, port = session.bound[0][4:].rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def start(nursery: trio.Nursery, config: ReceiverConfig) -> tuple[Session, list[object]]:
    outcome: list[object] = []

    async def run(task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            outcome.append(await serve_receiver(config, task_status=task_status))
        except MigrationFailed as exc:
            outcome.append(exc)

    session: Session = await nursery.start(run)
    return session, outcome


def setups(n: int) -> tuple[list[DeviceSetup], list[MemorySink], list[MemoryConfig]]:
    sinks = [MemorySink() for _ in range(n)]
    configs = [MemoryConfig(s) for s in sinks]
    devs = [DeviceSetup(f"0000:00:0{i}.0/vfio", i, sinks[i], configs[i]) for i in range(n)]
    return devs, sinks, configs


@pytest.mark.parametrize("listen", ["tcp:127.0.0.1:0", "unix"])
@pytest.mark.parametrize("order", ["roundrobin", "random", "shuffle"])
async def test_two_devices_four_channels(order: str, listen: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if listen == "unix":
        listen = f"unix:{tmp_path}/data.sock"
    devs, sinks, configs = setups(2)
    config = ReceiverConfig(uuid=UUID, channels=4, devices=devs, listen=[listen])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, config)
            senders = [
                SendDevice(d.idstr, d.instance, SynthSource(3_000_000 + i, i))
                for i, d in enumerate(devs)
            ]
            await send_migration(
                connect_to=session.bound,
                channels=4,
                uuid=UUID,
                devices=senders,
                packet_size=65536,
                order=order,
                seed=5,
            )
    report = outcome[0]
    assert isinstance(report, SessionReport) and report.ok
    for i, (sink, cfg) in enumerate(zip(sinks, configs, strict=True)):
        assert bytes(sink.data) == synth_bytes(3_000_000 + i, i)
        assert cfg.data == synth_config(i)
        # the config was loaded after every write and before finish
        assert cfg.sink_calls_at_load[-1] == "write" and sink.calls[-2:] == ["finish", "aclose"]
        assert report.devices[i].loaded and report.devices[i].bytes == 3_000_000 + i


async def test_gate_holds_data_until_opened_and_precopy_goes_first() -> None:
    devs, sinks, _ = setups(1)
    config = ReceiverConfig(uuid=UUID, channels=2, devices=devs, gate="control")
    state = os.urandom(50_000)
    packets = device_packets(devs[0].idstr, devs[0].instance, state, synth_config(0), 4096)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, config)
            device = next(iter(session.devices.values()))
            session.add_precopy(device, b"PRE-")
            streams = channel_streams(packets, 2, UUID, seed=3)
            for s in streams:
                conn = await open_channel(session)
                await conn.send_all(s)
                await conn.aclose()
            await trio.testing.wait_all_tasks_blocked()
            # Sockets deliver on the kernel's schedule: poll, bounded by fail_after.
            while device.buf.statistics().received_packets < len(packets):  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert bytes(sinks[0].data) == b"PRE-"  # multifd data held behind the gate
            assert not session.done.is_set()
            session.open_all_gates()
    assert bytes(sinks[0].data) == b"PRE-" + state
    assert isinstance(outcome[0], SessionReport) and outcome[0].ok


async def test_backpressure_with_idx0_last_stays_within_budget() -> None:
    devs, sinks, _ = setups(1)
    budget = 1 << 20
    config = ReceiverConfig(uuid=UUID, channels=4, devices=devs, max_queued=budget)
    size = 12 * budget
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, config)
            await send_migration(
                connect_to=session.bound,
                channels=4,
                uuid=UUID,
                devices=[SendDevice(devs[0].idstr, devs[0].instance, SynthSource(size, 9))],
                packet_size=65536,
                order="idx0-last",
            )
    report = outcome[0]
    assert isinstance(report, SessionReport) and report.ok
    assert bytes(sinks[0].data) == synth_bytes(size, 9)
    # budget, plus one packet (the device's next idx) and its config packet
    assert budget <= report.peak_queued_bytes <= budget + 65536 + len(synth_config(9))


class _SlowSink(MemorySink):
    """Takes 1 ms per 8 KiB: slower than the channels."""

    async def write(self, chunks):  # type: ignore[no-untyped-def]
        before = len(self.data)
        await super().write(chunks)
        await trio.sleep((len(self.data) - before) / 8e6)


async def test_a_slow_sink_holds_the_channels_to_its_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the sink writes, the channel reads ahead only until the device holds
    `SINK_BACKLOG`; the budget, 16 times larger, stays unused (the sender has it all
    sent at once, so without the cap the queue grows to the whole state)."""
    monkeypatch.setattr(loader_module, "SINK_BACKLOG", 256 * 1024)
    monkeypatch.setattr(channels_module, "PUMP_LIMIT", 64 * 1024)
    sink = _SlowSink()
    size = 4 << 20
    state = synth_bytes(size, 4)
    stream = channel_streams(device_packets("d", 0, state, synth_config(0), 65536), 1, UUID)[0]
    devs = [DeviceSetup("d", 0, sink, MemoryConfig(sink))]
    config = ReceiverConfig(uuid=UUID, channels=1, devices=devs, max_queued=size)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, config)
            conn = await open_channel(session)
            await conn.send_all(stream)
            await conn.aclose()
    report = outcome[0]
    assert isinstance(report, SessionReport) and report.ok, report
    assert bytes(sink.data) == state
    # the backlog, what the channel reads before the loader first runs, the config
    assert report.peak_queued_bytes <= 256 * 1024 + 64 * 1024 + 65536 + 4096, report


async def test_stall_timeout_names_what_is_missing() -> None:
    devs, sinks, _ = setups(1)
    config = ReceiverConfig(uuid=UUID, channels=1, devices=devs, gate="control", stall_timeout=0.5)
    packets = device_packets(devs[0].idstr, devs[0].instance, b"x" * 300, synth_config(0), 100)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, config)
            conn = await open_channel(session)
            await conn.send_all(channel_streams(packets, 1, UUID)[0])
            await session.done.wait()
            await conn.aclose()
    exc = outcome[0]
    assert isinstance(exc, MigrationFailed)
    assert exc.report.devices[0].error == (
        "0000:00:00.0/vfio/0: no progress for 0.5 s: every packet received,"
        " waiting for its gate (data-complete or switchover-start)"
    )
    assert sinks[0].data == b"" and "abort" in sinks[0].calls


async def test_sink_failure_names_device_and_idx_and_aborts() -> None:
    devs, _, _ = setups(2)
    bad = MemorySink(fail_at=5000)
    devs[1] = DeviceSetup(devs[1].idstr, devs[1].instance, bad, MemoryConfig())
    config = ReceiverConfig(uuid=UUID, channels=2, devices=devs)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, config)
            senders = [SendDevice(d.idstr, d.instance, SynthSource(100_000, 1)) for d in devs]
            # The receiver may read every channel to its end before its sink fails (the
            # budget holds it all): then the sender saw orderly closes (without a control
            # channel that is all it can know). If not, the channels were reset: one clear
            # error saying so.
            try:
                await send_migration(
                    connect_to=session.bound,
                    channels=2,
                    uuid=UUID,
                    devices=senders,
                    packet_size=1000,
                )
            except SendError as exc:
                assert re.match(
                    r"channel \d: the receiver closed the channel after \d+ bytes: it refused"
                    r" the channel or the migration failed",
                    str(exc),
                ), str(exc)
    failed = outcome[0]
    assert isinstance(failed, MigrationFailed)
    dev = failed.report.devices[1]
    # The failing write is the batch holding idx 5 (bytes 5000..5999); how many packets
    # the batch holds depends on how fast they came.
    assert dev.error is not None
    m = re.match(r"0000:00:01\.0/vfio/1: sink memory failed writing idx (\d+)\.\.(\d+)", dev.error)
    assert m is not None and int(m[1]) <= 5 <= int(m[2]), dev.error
    assert "Input/output error (errno 5)" in dev.error
    assert bytes(bad.data) == synth_bytes(100_000, 1)[: len(bad.data)]
    assert bad.calls[-2:] == ["abort", "aclose"]
    other = failed.report.devices[0]
    assert other.loaded or other.error == f"{other.name}: not loaded: {dev.error}"


async def test_bad_uuid_channel_is_refused_and_others_carry_on() -> None:
    devs, sinks, _ = setups(1)
    config = ReceiverConfig(uuid=UUID, channels=2, devices=devs)
    state = os.urandom(20_000)
    packets = device_packets(devs[0].idstr, devs[0].instance, state, synth_config(0), 1000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, config)
            intruder = await open_channel(session)
            await intruder.send_all(channel_streams(packets, 1, bytes(16))[0])
            await intruder.aclose()
            for s in channel_streams(packets, 2, UUID, seed=1):
                conn = await open_channel(session)
                await conn.send_all(s)
                await conn.aclose()
    report = outcome[0]
    assert isinstance(report, SessionReport) and report.ok
    assert report.channels_refused == 1 and report.channels_accepted == 2
    assert bytes(sinks[0].data) == state


@pytest.mark.parametrize("seed", range(8))  # orders where the last channel brings idx 0-2 too
async def test_every_channel_ended_lists_missing_idx(seed: int) -> None:
    devs, sinks, _ = setups(1)
    config = ReceiverConfig(uuid=UUID, channels=2, devices=devs)
    state = os.urandom(10_000)
    packets = device_packets(devs[0].idstr, devs[0].instance, state, synth_config(0), 1000)
    del packets[3], packets[6]  # idx 3 and 7 never come
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, config)
            for s in channel_streams(packets, 2, UUID, seed=seed):
                conn = await open_channel(session)
                await conn.send_all(s)
                await conn.aclose()
    exc = outcome[0]
    assert isinstance(exc, MigrationFailed)
    assert exc.report.devices[0].error == (
        "0000:00:00.0/vfio/0: every channel ended: missing idx 3, 7 (2 packets)"
    )
    assert bytes(sinks[0].data) == state[:3000]  # everything up to the first gap, nothing more


async def test_data_trickling_in_after_a_large_packet_is_not_held_back() -> None:
    """Inside a large packet's data a TCP channel waits for much of what the packet still
    needs (SO_RCVLOWAT); a large packet sent in pieces with pauses, then small packets one
    at a time, each waited for: every one is written as soon as it is complete."""
    sizes = [3000, 1_000_000, 3000, 3000, 3000, 3000]  # the first takes the slow path
    state = synth_bytes(sum(sizes), 2)
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    packets = [
        encode_packet("d", 0, i, 0, state[end - size : end])
        for i, (size, end) in enumerate(zip(sizes, ends, strict=True))
    ]
    config = encode_packet("d", 0, len(sizes), VFIO_FLAG_CONFIG_STATE, synth_config(0))
    sink = MemorySink()
    devices = [DeviceSetup("d", 0, sink, MemoryConfig(sink))]
    cfg = ReceiverConfig(uuid=UUID, channels=1, devices=devices, stall_timeout=5)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            session, outcome = await start(nursery, cfg)
            conn = await open_channel(session)
            await conn.send_all(channel_streams([], 1, UUID)[0])
            for pk, end in zip(packets, ends, strict=True):
                for i in range(0, len(pk), 100_000):  # the large one in pieces, with pauses
                    await trio.sleep(0.02)
                    await conn.send_all(pk[i : i + 100_000])
                with trio.fail_after(2):  # a wakeup held back for more bytes: stuck here
                    while len(sink.data) < end:  # noqa: ASYNC110 - test polling
                        await trio.sleep(0.002)
            await conn.send_all(config)
            await conn.aclose()
    assert isinstance(outcome[0], SessionReport) and outcome[0].ok, outcome
    assert bytes(sink.data) == state
