# ruff: noqa: SIM117  (fail_after stays its own block, around the whole test)
"""Sessions driven through the control channel: the kernel VFIO sink on the fake device
model, TLS, several devices, refusals, and `send_migration(control=...)`."""

from __future__ import annotations

import random
import socket
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trustme

from tests.integration.control_helpers import (
    CONFIG,
    IDSTR,
    PRECOPY,
    STATE,
    UUID,
    expect,
    running_receiver,
    send_channel,
    streams,
)
from vfiomig import (
    DeviceSetup,
    MigrationFailed,
    ReceiverConfig,
    SendDevice,
    SessionReport,
    VfioMigError,
    send_migration,
    serve_receiver,
)
from vfiomig._core._wire import encode_handshake
from vfiomig.control import AttachSink, ControlServer, open_control_client
from vfiomig.send import SendStatus
from vfiomig.send._control import ReceiverFailed
from vfiomig.sources._simple import open_synth_source
from vfiomig.testing import FakeVfioDevice, MemorySink, channel_streams, device_packets, synth_bytes
from vfiomig.vfio._uapi import MigState


async def test_vfio_device_fd_through_control_channel(tmp_path: Path) -> None:
    expected = PRECOPY + STATE
    with FakeVfioDevice(expected=expected, max_write=50_000) as fake:
        sink = AttachSink(timeout=10, ioctl=fake.ioctl, write=fake.write)
        with trio.fail_after(20):
            async with running_receiver(tmp_path, [(IDSTR, 0, sink)]) as rx:
                async with open_control_client(rx.control_address) as ctl:
                    fd = fake.open()
                    await ctl.attach_fd(IDSTR, 0, fd, "vfio-device")
                    await ctl.precopy(IDSTR, 0, PRECOPY)
                    await ctl.data_complete(IDSTR, 0)
                    async with trio.open_nursery() as nursery:
                        for data in streams():
                            nursery.start_soon(send_channel, rx.data_address, data)
                    assert (await expect(ctl, "config"))["data"] == CONFIG
                    await expect(ctl, "loaded")
                    assert (await expect(ctl, "done"))["ok"] is True
        assert fake.loaded == expected
        assert fake.state == MigState.STOP
        assert fake.arcs[-1] == (MigState.RESUMING, MigState.STOP)
        assert fake.resets == 0


async def test_vfio_bad_data_at_stop_resets_and_reports_errno(tmp_path: Path) -> None:
    with FakeVfioDevice(expected=b"something else") as fake:
        sink = AttachSink(timeout=10, ioctl=fake.ioctl, write=fake.write)
        with trio.fail_after(20):
            async with running_receiver(tmp_path, [(IDSTR, 0, sink)], gate="open") as rx:
                async with open_control_client(rx.control_address) as ctl:
                    await ctl.attach_fd(IDSTR, 0, fake.open(), "vfio-device")
                    async with trio.open_nursery() as nursery:
                        for data in streams():
                            nursery.start_soon(send_channel, rx.data_address, data)
                    error = await expect(ctl, "error")
                    assert error["message"].startswith(f"{IDSTR}/0: finishing sink attach:vfio:fd ")
                    assert "leaving RESUMING failed" in error["message"]
                    assert (await expect(ctl, "done"))["ok"] is False
        assert fake.resets == 1 and fake.state == MigState.RUNNING
    (failed,) = rx.outcome
    assert isinstance(failed, MigrationFailed)


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def pki() -> tuple[trustme.CA, trustme.LeafCert, trustme.LeafCert]:
    ca = trustme.CA()
    return ca, ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("client.example")


def _server_ctx(ca: trustme.CA, server: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_ctx(trust: trustme.CA, cert: trustme.LeafCert | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    trust.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


async def test_tls_happy_path_and_wrong_certificates(
    tmp_path: Path, pki: tuple[trustme.CA, trustme.LeafCert, trustme.LeafCert]
) -> None:
    ca, server, client = pki
    rogue_ca = trustme.CA()
    rogue = rogue_ca.issue_cert("client.example")
    sink = MemorySink()
    good = _client_ctx(ca, client)
    with trio.fail_after(20):
        async with running_receiver(
            tmp_path,
            [(IDSTR, 0, sink)],
            gate="open",
            control_tcp=True,
            tls=_server_ctx(ca, server),
        ) as rx:
            # A certificate from another CA, no certificate, plain bytes: each refused
            # before a byte reaches the framer. (Under TLS 1.3 the client may finish its
            # handshake and write before the server's refusal arrives, so a client-side
            # error is not guaranteed; what counts is the receiver's side.)
            for bad in (_client_ctx(ca, rogue), _client_ctx(ca, None), None):
                await send_channel(rx.data_address, streams()[0], tls=bad, may_be_cut=True)
            with trio.fail_after(5):
                while rx.session.channels_refused < 3:  # noqa: ASYNC110 - no event for a refusal
                    await trio.sleep(0.01)
            assert bytes(sink.data) == b"" and rx.session.channels_accepted == 0
            async with open_control_client(rx.control_address, tls=good) as ctl:
                await ctl.hello()  # the config event goes to a connection that spoke
                async with trio.open_nursery() as nursery:
                    for data in streams():
                        nursery.start_soon(send_channel, rx.data_address, data, good)
                assert (await expect(ctl, "done"))["ok"] is True
    assert bytes(sink.data) == STATE


# -- several devices, refusals -------------------------------------------------------------


async def test_four_devices_over_six_channels(tmp_path: Path) -> None:
    states = [random.Random(i).randbytes(50_000 + i * 7777) for i in range(4)]
    sinks = [MemorySink() for _ in states]
    packets = [
        p
        for i, state in enumerate(states)
        for p in device_packets(f"dev{i}", i, state, CONFIG, 4096)
    ]
    with trio.fail_after(20):
        async with running_receiver(
            tmp_path,
            [(f"dev{i}", i, s) for i, s in enumerate(sinks)],
            channels=6,
            max_queued=64 << 10,
        ) as rx:
            async with open_control_client(rx.control_address) as ctl:
                await ctl.switchover_start()
                async with trio.open_nursery() as nursery:
                    for data in channel_streams(packets, 6, UUID, seed=11):
                        nursery.start_soon(send_channel, rx.data_address, data)
                loaded = {(await expect(ctl, "loaded"))["device"] for _ in states}
                assert loaded == {f"dev{i}" for i in range(4)}
                assert (await expect(ctl, "done"))["ok"] is True
    assert [bytes(s.data) for s in sinks] == states
    (report,) = rx.outcome
    assert isinstance(report, SessionReport)
    assert report.channels_accepted == 6 and report.peak_queued_bytes <= (64 << 10) + 6 * 4200


async def test_one_failing_device_fails_the_session_cleanly(tmp_path: Path) -> None:
    sinks = [MemorySink(), MemorySink(fail_at=10_000), MemorySink()]
    packets = [p for i in range(3) for p in device_packets(f"d{i}", 0, STATE, CONFIG, 4096)]
    with trio.fail_after(20):
        async with running_receiver(
            tmp_path, [(f"d{i}", 0, s) for i, s in enumerate(sinks)], channels=3, gate="open"
        ) as rx:
            async with open_control_client(rx.control_address) as ctl:
                await ctl.hello()  # the config event goes to a connection that spoke
                async with trio.open_nursery() as nursery:
                    for data in channel_streams(packets, 3, UUID):
                        nursery.start_soon(
                            partial(send_channel, rx.data_address, data, may_be_cut=True)
                        )
                error = await expect(ctl, "error")
                assert error["device"] == "d1"
                assert error["message"].startswith("d1/0: sink memory failed writing idx ")
                assert (await expect(ctl, "done"))["ok"] is False
    (failed,) = rx.outcome
    assert isinstance(failed, MigrationFailed)
    assert failed.report.devices[1].error == error["message"]
    assert all(s.calls[-1] == "aclose" for s in sinks)
    assert "finish" not in sinks[1].calls and "abort" in sinks[1].calls


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (encode_handshake(bytes(16), 0), "uuid"),
        (b"\x11\x22\x33\x44" + b"\0" * 10, "short handshake"),
        (b"GET / HTTP/1.1\r\n" * 4, "garbage"),
        (b"", "timeout"),
    ],
)
async def test_refused_channels_do_not_disturb_the_session(
    tmp_path: Path, stream: bytes, why: str
) -> None:
    sink = MemorySink()
    with trio.fail_after(20):
        async with running_receiver(
            tmp_path, [(IDSTR, 0, sink)], gate="open", handshake_timeout=2.0
        ) as rx:  # the valid channels' handshakes too must come within it, under load
            async with open_control_client(rx.control_address) as ctl:
                await ctl.hello()  # the config event goes to a connection that spoke
                if why == "timeout":
                    from vfiomig.transport import connect, parse_address

                    idle = await connect(parse_address(rx.data_address))
                else:
                    await send_channel(rx.data_address, stream)
                with trio.fail_after(5):
                    while rx.session.channels_refused < 1:  # noqa: ASYNC110 - no event for a refusal
                        await trio.sleep(0.01)
                async with trio.open_nursery() as nursery:
                    for data in streams():
                        nursery.start_soon(send_channel, rx.data_address, data)
                assert (await expect(ctl, "done"))["ok"] is True
                if why == "timeout":
                    with pytest.raises(trio.BrokenResourceError, match="reset"):
                        await idle.receive_some(10)  # refused by the receiver: reset
                    await idle.aclose()
    assert bytes(sink.data) == STATE
    assert rx.session.channels_refused == 1


# -- the sender's side ---------------------------------------------------------------------


@pytest.mark.parametrize("switchover", ["switchover-start", "data-complete"])
async def test_send_migration_drives_the_control_channel(tmp_path: Path, switchover: str) -> None:
    size = 3 << 20
    sink = MemorySink()
    status = SendStatus()
    with trio.fail_after(30):
        # A budget far below the state: without the gate opened first, this would stall.
        async with running_receiver(
            tmp_path, [(IDSTR, 0, sink)], max_queued=256 << 10, stall_timeout=5
        ) as rx:
            report = await send_migration(
                connect_to=[rx.data_address],
                channels=2,
                uuid=UUID,
                devices=[SendDevice(IDSTR, 0, open_synth_source(f"{size}:4"))],
                packet_size=64 << 10,
                control=rx.control_address,
                precopy={(IDSTR, 0): PRECOPY},
                switchover=switchover,
                status=status,
            )
    assert [e["type"] for e in report.control_events] == ["loaded", "done"]
    assert (status.phase, status.done.is_set(), status.channels) == ("done", True, 0)
    assert status.precopy_bytes == len(PRECOPY) and status.sent_bytes == sum(report.channel_bytes)
    assert report.control_events[0]["bytes"] == len(PRECOPY) + size
    assert bytes(sink.data) == PRECOPY + synth_bytes(size, 4)


async def test_send_migration_reports_receiver_failure(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_receiver(tmp_path, [(IDSTR, 0, MemorySink(fail_at=1000))]) as rx:
            with pytest.raises(ReceiverFailed, match=f"receiver failed: {IDSTR}/0: sink memory"):
                await send_migration(
                    connect_to=[rx.data_address],
                    channels=2,
                    uuid=UUID,
                    devices=[SendDevice(IDSTR, 0, open_synth_source("200000:1"))],
                    packet_size=4096,
                    control=rx.control_address,
                )


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_send_migration_control_lost_before_done(tmp_path: Path, how: str) -> None:
    """The control connection goes away after the data went out but before ``done``: the
    sender cannot know whether the device loaded, so it fails with one clear line (a reset
    was a raw trio.BrokenResourceError)."""
    import msgpack

    control_path, data_path = tmp_path / "ctl.sock", tmp_path / "data.sock"
    control = trio.socket.socket(trio.socket.AF_UNIX)
    await control.bind(str(control_path))
    control.listen()
    data = trio.socket.socket(trio.socket.AF_UNIX)
    await data.bind(str(data_path))
    data.listen()
    drained = trio.Event()

    async def drain_channel() -> None:
        conn, _ = await data.accept()
        with conn:
            while await conn.recv(1 << 16):
                pass
        drained.set()

    async def control_peer() -> None:
        conn, _ = await control.accept()
        with conn:
            await conn.recv(1 << 16)  # hello
            reply = {"type": "hello", "version": 1, "channels": 1, "devices": [[IDSTR, 0]]}
            await conn.send(msgpack.packb(reply))
            await drained.wait()
            # A UNIX socket closed with unread bytes (the switchover message) resets the
            # peer's end; one closed after reading everything ends it cleanly.
            if how == "close":  # read up to the switchover message: nothing comes after it
                unpacker = msgpack.Unpacker()
                seen: list[object] = []
                while "switchover-start" not in seen:
                    data = await conn.recv(1 << 16)
                    assert data, "the sender closed the control channel first"
                    unpacker.feed(data)
                    seen += [m.get("type") for m in unpacker]

    with control, data, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_channel)
            nursery.start_soon(control_peer)
            with pytest.raises(VfioMigError) as info:
                await send_migration(
                    connect_to=[f"unix:{data_path}"],
                    channels=1,
                    uuid=UUID,
                    devices=[SendDevice(IDSTR, 0, open_synth_source("100000:1"))],
                    packet_size=4096,
                    control=f"unix:{control_path}",
                )
    cause = "the connection broke (" if how == "reset" else "the receiver closed it"
    assert str(info.value).startswith(f"control channel: {cause}")
    assert str(info.value).endswith("before its done event: whether the devices loaded is unknown")


async def test_every_log_line_of_a_control_session_has_an_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--log-format json` consumers filter on the event name: a session driven through the
    control channel, sender and receiver in one process, logs none as the default "log"."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="vfiomig"), trio.fail_after(30):
        async with running_receiver(tmp_path, [(IDSTR, 0, MemorySink())]) as rx:
            async with open_control_client(rx.control_address) as idle:
                await idle.hello()  # a second connection: connected, then closed by us
            await send_migration(
                connect_to=[rx.data_address],
                channels=2,
                uuid=UUID,
                devices=[SendDevice(IDSTR, 0, open_synth_source("200000:1"))],
                packet_size=4096,
                control=rx.control_address,
            )
    events = [getattr(r, "event", None) for r in caplog.records]
    unnamed = [r.getMessage() for r in caplog.records if getattr(r, "event", None) is None]
    assert not unnamed
    assert {"control_connected", "control_closed", "control_eof"} <= set(events)


async def test_a_connection_accepted_as_the_session_ends_is_ended_at_once(tmp_path: Path) -> None:
    """trio's accept returns a connection it took even when its task was cancelled
    meanwhile (the last checkpoint is shielded), so the accept loop may add a connection
    after the final flush began. That one gets ``done`` and is closed at once: it must not
    hold the session's end until the flush deadline (15 s here; the receiver's default 5 s
    was what a SIGTERM during a control-channel flood took, 3 runs in 8)."""
    path = f"{tmp_path}/ctl.sock"
    control = ControlServer(f"unix:{path}", flush_timeout=15)
    accept = control.admission.accept
    late: list[bool] = []

    async def accepted_as_the_session_ends(listener: Any) -> trio.SocketStream:
        if late:  # once: then the loop's next accept sees the cancel, as trio's would
            return await accept(listener)
        late.append(True)
        with trio.CancelScope(shield=True):  # what trio's accept does once it has one
            await control._finishing.wait()
            stream = await accept(listener)
        return stream

    control.admission.accept = accepted_as_the_session_ends  # type: ignore[method-assign]
    config = ReceiverConfig(
        uuid=UUID,
        channels=1,
        devices=[DeviceSetup(IDSTR, 0, MemorySink())],
        config_target=control.config_target,
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_receiver, config, extra_tasks=[control.serve]))
            while control.bound is None:  # noqa: ASYNC110 - no event for "listening"
                await trio.sleep(0.01)
            client = trio.socket.socket(socket.AF_UNIX)
            await client.connect(path)  # waits in the backlog until the session ends
            nursery.cancel_scope.cancel()
        with client:
            got = b""
            while chunk := await client.recv(4096):
                got += chunk
    assert msgpack.unpackb(got) == {"type": "done", "ok": False}
