# ruff: noqa: SIM117  (fail_after stays its own block, around the whole test)
"""Control channel conformance (SPEC.md §3): every message, every error, fd passing."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

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
from vfiomig import MigrationFailed, SessionReport
from vfiomig.control import AttachSink, ControlClient, open_control_client
from vfiomig.testing import MemorySink, channel_streams, device_packets


async def test_hello_reply(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with (
            running_receiver(tmp_path, [(IDSTR, 0, MemorySink()), ("x", 7, MemorySink())]) as rx,
            open_control_client(rx.control_address) as ctl,
        ):
            reply = await ctl.hello()
            assert reply == {
                "type": "hello",
                "version": 1,
                "channels": 2,
                "devices": [{"device": IDSTR, "instance": 0}, {"device": "x", "instance": 7}],
            }
            await ctl.abort("test over")
            assert (await expect(ctl, "done"))["ok"] is False


async def test_hello_keeps_the_events_before_its_reply_in_order() -> None:
    # Progress events can reach a connection before its hello reply: hello() keeps them
    # for next_event, in order, also on a second hello (the backlog once made it spin).
    ours, theirs = trio.testing.memory_stream_pair()
    client = ControlClient(ours)

    def event(kind: str, n: int) -> bytes:
        return msgpack.packb({"type": kind, "n": n})

    with trio.fail_after(5):
        await theirs.send_all(event("progress", 1) + event("progress", 2) + event("hello", 0))
        assert (await client.hello())["n"] == 0
        await theirs.send_all(event("progress", 3) + event("hello", 1))
        assert (await client.hello())["n"] == 1
        assert [(await client.next_event() or {})["n"] for _ in range(3)] == [1, 2, 3]
        await theirs.aclose()
        assert await client.next_event() is None
        await client.aclose()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"type": "no-such-thing"}, "control message type 'no-such-thing' is unknown"),
        ({"version": 1}, "control message has no string field 'type'"),
        ({"type": 5}, "control message has no string field 'type'"),
        ([1, 2, 3], "control message is a list, not a map"),
        ("hello", "control message is a str, not a map"),
        ({"type": "hello"}, "hello message lacks field 'version'"),
        ({"type": "hello", "version": 2}, "control version 2 is not supported (1)"),
        ({"type": "hello", "version": "1"}, "hello message field 'version' has type str"),
        (
            {"type": "precopy", "device": IDSTR, "instance": 0, "data": "text"},
            "precopy message field 'data' has type str",
        ),
        (
            {"type": "precopy", "device": IDSTR, "instance": True, "data": b""},
            "precopy message field 'instance' has type bool",
        ),
        (
            {"type": "precopy", "device": "nope", "instance": 0, "data": b"x"},
            "precopy for unknown device 'nope' instance 0",
        ),
        (
            {"type": "data-complete", "device": IDSTR, "instance": 1},
            f"data-complete for unknown device '{IDSTR}' instance 1",
        ),
        (
            {"type": "data-complete", "device": IDSTR, "instance": -1},
            "data-complete message instance -1 is out of range",
        ),
        ({"type": "data-complete", "instance": 0}, "data-complete message lacks field 'device'"),
        (
            {"type": "attach-fd", "device": IDSTR, "instance": 0, "kind": "socket"},
            "attach-fd message kind 'socket' is unknown",
        ),
        (
            {"type": "attach-fd", "device": IDSTR, "instance": 0, "kind": "data"},
            f"{IDSTR}/0: attach-fd carried 0 fds (expected 1)",
        ),
        ({"type": "abort"}, "abort message lacks field 'reason'"),
    ],
)
async def test_bad_message_gets_error_and_is_ignored(
    tmp_path: Path, message: object, error: str
) -> None:
    sink = MemorySink()
    with trio.fail_after(10):
        async with running_receiver(tmp_path, [(IDSTR, 0, sink)]) as rx:
            async with open_control_client(rx.control_address) as ctl:
                await ctl.send_raw(msgpack.packb(message, use_bin_type=True))
                reply = await expect(ctl, "error")
                assert reply["message"] == error
                # Ignored: the connection and the session carry on.
                assert (await ctl.hello())["version"] == 1
                assert not rx.session.failed
                await ctl.abort("test over")
                assert (await expect(ctl, "done"))["ok"] is False


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xc1", "control stream is not valid msgpack"),
        (
            msgpack.packb({"type": "precopy", "data": b"x" * 5000}),
            "control message above a size limit (5000 exceeds",
        ),
    ],
)
async def test_framing_error_drops_only_that_connection(
    tmp_path: Path, raw: bytes, error: str
) -> None:
    with trio.fail_after(10):
        async with running_receiver(tmp_path, [(IDSTR, 0, MemorySink())], max_message=4096) as rx:
            async with (
                open_control_client(rx.control_address) as bad,
                open_control_client(rx.control_address) as good,
            ):
                await good.hello()
                await bad.send_raw(raw)
                reply = await bad.next_event()
                while reply is not None and reply["type"] == "progress":  # every connection's
                    reply = await bad.next_event()
                assert reply is not None and error in reply["message"]
                while (after := await bad.next_event()) is not None:  # closed by the receiver
                    assert after["type"] == "progress", after
                assert (await good.hello())["channels"] == 2
                await good.abort("test over")
                await expect(good, "done")


async def test_full_session_precopy_data_complete_config_loaded_done(tmp_path: Path) -> None:
    sink = MemorySink()
    with trio.fail_after(20):
        async with running_receiver(tmp_path, [(IDSTR, 0, sink)]) as rx:
            async with open_control_client(rx.control_address) as ctl:
                await ctl.hello()
                await ctl.precopy(IDSTR, 0, PRECOPY[:100])
                await ctl.precopy(IDSTR, 0, PRECOPY[100:])
                async with trio.open_nursery() as nursery:
                    for data in streams():
                        nursery.start_soon(send_channel, rx.data_address, data)
                # Every packet is in, but the gate holds the multifd data back.
                progress = await expect(ctl, "progress")
                assert progress["device"] == IDSTR and progress["instance"] == 0
                assert progress["written"] <= len(PRECOPY)
                assert bytes(sink.data) == PRECOPY[: len(sink.data)]
                await ctl.data_complete(IDSTR, 0)
                config = await expect(ctl, "config")
                assert config == {"type": "config", "device": IDSTR, "instance": 0, "data": CONFIG}
                loaded = await expect(ctl, "loaded")
                assert loaded["bytes"] == len(PRECOPY) + len(STATE)
                assert loaded["packets"] == len(STATE) // 16384 + 1
                assert loaded["seconds"] >= 0
                assert (await expect(ctl, "done")) == {"type": "done", "ok": True}
                assert await ctl.next_event() is None
    assert bytes(sink.data) == PRECOPY + STATE
    assert sink.calls[-2:] == ["finish", "aclose"]
    (report,) = rx.outcome
    assert isinstance(report, SessionReport) and report.ok
    assert report.devices[0].precopy_bytes == len(PRECOPY)


async def test_switchover_start_opens_every_gate(tmp_path: Path) -> None:
    sinks = [MemorySink(), MemorySink()]
    with trio.fail_after(20):
        async with running_receiver(tmp_path, [("a", 0, sinks[0]), ("b", 0, sinks[1])]) as rx:
            async with open_control_client(rx.control_address) as ctl:
                await ctl.switchover_start()
                packets = device_packets("a", 0, STATE, CONFIG, 8192)
                packets += device_packets("b", 0, STATE[::-1], CONFIG, 8192)
                async with trio.open_nursery() as nursery:
                    for data in channel_streams(packets, 2, UUID, seed=5):
                        nursery.start_soon(send_channel, rx.data_address, data)
                loaded = {(await expect(ctl, "loaded"))["device"] for _ in range(2)}
                assert loaded == {"a", "b"}
                assert (await expect(ctl, "done"))["ok"] is True
    assert bytes(sinks[0].data) == STATE and bytes(sinks[1].data) == STATE[::-1]


async def test_config_waits_for_a_control_connection(tmp_path: Path) -> None:
    sink = MemorySink()
    with trio.fail_after(20):
        async with running_receiver(tmp_path, [(IDSTR, 0, sink)], gate="open") as rx:
            async with trio.open_nursery() as nursery:
                for data in streams():
                    nursery.start_soon(send_channel, rx.data_address, data)
            assert sink.calls == ["start", *["write"] * (len(sink.calls) - 1)]
            # No connection yet: the config blob is held, the device cannot finish.
            async with open_control_client(rx.control_address) as silent:
                # A connection that sent nothing may be a stranger: it never gets the blob.
                async with open_control_client(rx.control_address) as ctl:
                    await ctl.hello()
                    config = await expect(ctl, "config")
                    assert config["data"] == CONFIG
                    await expect(ctl, "loaded")
                    assert (await expect(ctl, "done"))["ok"] is True
                while (event := await silent.next_event()) is not None:
                    assert event["type"] != "config", event
    assert "finish" in sink.calls


async def test_abort_fails_every_device(tmp_path: Path) -> None:
    sinks = [MemorySink(), MemorySink()]
    with trio.fail_after(10):
        async with running_receiver(tmp_path, [("a", 0, sinks[0]), ("b", 1, sinks[1])]) as rx:
            async with open_control_client(rx.control_address) as ctl:
                await ctl.abort("operator said so")
                errors = {(await expect(ctl, "error"))["device"] for _ in range(2)}
                assert errors == {"a", "b"}
                assert (await expect(ctl, "done")) == {"type": "done", "ok": False}
    (failed,) = rx.outcome
    assert isinstance(failed, MigrationFailed)
    assert [d.error for d in failed.report.devices] == [
        "a/0: migration aborted: operator said so",
        "b/1: migration aborted: operator said so",
    ]
    assert all(s.calls == ["abort", "aclose"] or "abort" in s.calls for s in sinks)


async def test_every_connection_gets_events(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with running_receiver(tmp_path, [(IDSTR, 0, MemorySink())]) as rx:
            async with (
                open_control_client(rx.control_address) as one,
                open_control_client(rx.control_address) as two,
            ):
                await one.hello()
                await two.hello()
                await one.abort("bye")
                for ctl in (one, two):
                    assert (await expect(ctl, "error"))["device"] == IDSTR
                    assert (await expect(ctl, "done"))["ok"] is False


async def test_connections_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with running_receiver(tmp_path, [(IDSTR, 0, MemorySink())]) as rx:
            clients = []
            async with AsyncExitStack() as stack:
                for _ in range(rx.control.max_connections):
                    ctl = await stack.enter_async_context(open_control_client(rx.control_address))
                    await ctl.hello()
                    clients.append(ctl)
                extra = await stack.enter_async_context(open_control_client(rx.control_address))
                reply = await extra.next_event()
                assert reply == {"type": "error", "message": "too many control connections (4)"}
                assert await extra.next_event() is None
                assert rx.control.refused == 1
                await clients[0].abort("done")
                await expect(clients[0], "done")


# -- attach-fd -----------------------------------------------------------------------------


async def test_attach_data_fd_over_unix_socket(tmp_path: Path) -> None:
    """A pipe's write end travels as SCM_RIGHTS; the state comes out of its read end."""
    sink = AttachSink(timeout=10)
    rfd, wfd = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(rfd, 65536):
            got.extend(chunk)

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as outer:
                outer.start_soon(trio.to_thread.run_sync, drain)
                async with running_receiver(tmp_path, [(IDSTR, 0, sink)]) as rx:
                    async with open_control_client(rx.control_address) as ctl:
                        await ctl.attach_fd(IDSTR, 0, wfd, "data")
                        os.close(wfd)  # the receiver holds its own copy now
                        wfd = -1
                        await ctl.precopy(IDSTR, 0, PRECOPY)
                        await ctl.data_complete(IDSTR, 0)
                        async with trio.open_nursery() as nursery:
                            for data in streams():
                                nursery.start_soon(send_channel, rx.data_address, data)
                        await expect(ctl, "loaded")
                        assert (await expect(ctl, "done"))["ok"] is True
                # drain() ends at EOF: the receiver closed its copy of the write end.
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    assert bytes(got) == PRECOPY + STATE


async def test_attach_fd_refused_closes_the_fd(tmp_path: Path) -> None:
    """attach-fd to a device whose sink is not attach:, and a second attach-fd: each gets
    an error and the receiver keeps no copy of the fd (the pipe's read end sees EOF)."""
    attach = AttachSink(timeout=10)
    with trio.fail_after(10):
        async with running_receiver(tmp_path, [("mem", 0, MemorySink()), (IDSTR, 0, attach)]) as rx:
            async with open_control_client(rx.control_address) as ctl:
                first = os.pipe()
                await ctl.attach_fd(IDSTR, 0, first[1], "data")
                for device, expected in [
                    (
                        "mem",
                        "mem/0: attach-fd for a device whose sink is memory (expected attach:)",
                    ),
                    (IDSTR, f"{IDSTR}/0: attach-fd refused: attach:vfio:data fd"),
                ]:
                    rfd, wfd = os.pipe()
                    await ctl.attach_fd(device, 0, wfd, "data")
                    os.close(wfd)
                    reply = await expect(ctl, "error")
                    assert reply["message"].startswith(expected)
                    assert reply["device"] == device
                    assert await trio.to_thread.run_sync(os.read, rfd, 1) == b""
                    os.close(rfd)
                await ctl.abort("test over")
                await expect(ctl, "done")
            os.close(first[1])
            # The attached fd was closed by the sink at the end of the session.
            assert await trio.to_thread.run_sync(os.read, first[0], 1) == b""
            os.close(first[0])


class _AttachWhenTold(AttachSink):
    """An attach: sink whose wait for the fd (and its timer) starts when the test says, not
    when the session starts: the control client is connected by then."""

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.go = trio.Event()

    async def start(self) -> None:
        await self.go.wait()
        await super().start()


async def test_attach_timeout_fails_the_device(tmp_path: Path) -> None:
    sink = _AttachWhenTold(timeout=0.2)
    with trio.fail_after(10):
        async with running_receiver(tmp_path, [(IDSTR, 0, sink)]) as rx:
            async with open_control_client(rx.control_address) as ctl:
                await ctl.hello()  # events go to connections that spoke
                sink.go.set()
                error = await expect(ctl, "error")
                assert error["message"] == (
                    f"{IDSTR}/0: starting sink attach: failed: no attach-fd within 0.2 s"
                )
                assert (await expect(ctl, "done"))["ok"] is False


async def test_attach_fd_over_tcp_carries_no_fd(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with running_receiver(
            tmp_path, [(IDSTR, 0, AttachSink(timeout=10))], control_tcp=True
        ) as rx:
            assert rx.control_address.startswith("tcp:127.0.0.1:")
            async with open_control_client(rx.control_address) as ctl:
                await ctl.send(
                    {"type": "attach-fd", "device": IDSTR, "instance": 0, "kind": "data"}
                )
                reply = await expect(ctl, "error")
                assert reply["message"] == f"{IDSTR}/0: attach-fd carried 0 fds (expected 1)"
                await ctl.abort("test over")
                await expect(ctl, "done")
