"""Admission of connections (`vfiomig.transport.Admission`) through real listeners on
loopback: the pending cap evicts the connection silent the longest, so a real channel or
VMM gets in while strangers hold every pending place; a shortage of fds on accept is
waited out. The floods past a real fd limit are in tests/e2e/test_strangers.py."""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from tests.integration.control_helpers import (
    CONFIG,
    IDSTR,
    expect,
    running_receiver,
    send_channel,
    streams,
)
from tests.integration.control_helpers import STATE as CONTROL_STATE
from tests.integration.faults import UUID, Snapshot, connect, idstr, receiver, reset
from vfiomig import SessionReport
from vfiomig._core._wire import HANDSHAKE_SIZE, encode_handshake
from vfiomig.control import open_control_client
from vfiomig.testing import MemorySink, channel_streams, device_packets
from vfiomig.transport import Admission, nonblocking_twin
from vfiomig.transport._admission import BURST_GAP, EVICT_GRACE, RESERVE

STATE = bytes(range(256)) * 64


async def wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110 - polling a test condition
            await trio.sleep(0.005)


async def test_the_real_channel_evicts_the_stranger_silent_the_longest() -> None:
    snapshot = Snapshot.take()
    sink = MemorySink()
    packets = device_packets(idstr(0), 0, STATE, CONFIG, 1000)
    with trio.fail_after(10):
        async with receiver([sink], channels=1, max_pending=2, handshake_timeout=30) as rx:
            admission = rx.session.admission
            idle = await connect(rx)
            await wait_for(lambda: admission.statistics().pending == 1, "idle pending")
            partial = await connect(rx)  # sends part of a handshake after idle's accept
            await partial.send_all(encode_handshake(UUID, 0)[:10])
            await wait_for(
                lambda: any(t.received == 10 for t in admission._pending), "partial noted"
            )
            real = await connect(rx)  # the third: at the cap, one of the others must go
            await wait_for(lambda: admission.statistics().evicted == 1, "an eviction")
            with trio.fail_after(2), pytest.raises(trio.BrokenResourceError, match="reset"):
                await idle.receive_some(10)  # evicted: reset by the receiver (a refusal)
            await real.send_all(channel_streams(packets, 1, UUID)[0])
            await real.aclose()
            await rx.session.done.wait()
            stats = admission.statistics()
            assert (stats.pending, stats.evicted, stats.admitted) == (1, 1, 1)
            await partial.aclose()
            await idle.aclose()
    report = rx.outcome[0]
    assert isinstance(report, SessionReport), str(report)
    assert bytes(sink.data) == STATE
    assert (report.channels_evicted, report.channels_refused, report.channels_accepted) == (1, 0, 1)
    snapshot.check()


async def test_strangers_arriving_without_end_do_not_keep_the_real_channels_out() -> None:
    """Strangers keep connecting (idle ones and partial handshakes, far more than the cap)
    while the two real channels connect: both get in, the session loads."""
    sink = MemorySink()
    packets = device_packets(idstr(0), 0, STATE, CONFIG, 1000)
    strangers: list[trio.SocketStream] = []
    with trio.fail_after(20):
        async with receiver([sink], channels=2, max_pending=4, handshake_timeout=30) as rx:

            async def flood() -> None:
                for i in range(200):  # bounded
                    if rx.session.done.is_set():
                        return
                    try:
                        s = await connect(rx)
                    except OSError:  # the session ended and its listener closed
                        return
                    strangers.append(s)
                    if i % 2:
                        try:
                            await s.send_all(b"\x11")
                        except trio.BrokenResourceError:
                            pass  # evicted already
                    assert rx.session.admission.statistics().pending <= 4
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                while len(strangers) < 20:  # noqa: ASYNC110 - the flood is under way
                    await trio.sleep(0.001)
                for data in channel_streams(packets, 2, UUID, seed=3):
                    nursery.start_soon(send_channel_raw, rx, data)
            await rx.session.done.wait()
            for s in strangers:
                await s.aclose()
    report = rx.outcome[0]
    assert isinstance(report, SessionReport), str(report)
    assert bytes(sink.data) == STATE
    assert report.channels_accepted == 2
    assert report.channels_evicted >= 10


async def test_a_reset_during_the_handshake_is_a_refusal() -> None:
    sink = MemorySink()
    packets = device_packets(idstr(0), 0, STATE, CONFIG, 1000)
    with trio.fail_after(10):
        async with receiver([sink], channels=1, handshake_timeout=30) as rx:
            admission = rx.session.admission
            for _ in range(3):
                rude = await connect(rx)
                await rude.send_all(b"\x11\x22")
                await wait_for(lambda: admission.statistics().pending == 1, "pending")
                reset(rude)
                await wait_for(lambda: admission.statistics().pending == 0, "gone")
            assert admission.statistics().refused == 3
            await send_channel_raw(rx, channel_streams(packets, 1, UUID)[0])
    report = rx.outcome[0]
    assert isinstance(report, SessionReport), str(report)
    assert bytes(sink.data) == STATE and report.channels_refused == 3


async def send_channel_raw(rx, data: bytes) -> None:  # type: ignore[no-untyped-def]
    conn = await connect(rx)
    await conn.send_all(data)
    await conn.aclose()


async def test_tls_handshakes_count_as_pending(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    from vfiomig.transport import client_context, server_context

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = server_context(str(tmp_path / "server.pem"), str(tmp_path / "server.pem"))
    client = client_context(str(tmp_path / "ca.pem"))
    sink = MemorySink()
    packets = device_packets(idstr(0), 0, STATE, CONFIG, 1000)
    with trio.fail_after(10):
        async with receiver(
            [sink], channels=1, max_pending=2, handshake_timeout=30, tls=server
        ) as rx:
            admission = rx.session.admission
            silent = [await connect(rx) for _ in range(2)]  # never start TLS
            await wait_for(lambda: admission.statistics().pending == 2, "strangers pending")
            real = trio.SSLStream(await connect(rx), client, server_hostname="127.0.0.1")
            await wait_for(lambda: admission.statistics().evicted == 1, "an eviction")
            with trio.fail_after(2), pytest.raises(trio.BrokenResourceError, match="reset"):
                await silent[0].receive_some(10)  # the older one was evicted: reset
            await real.send_all(channel_streams(packets, 1, UUID)[0])
            await real.aclose()
            await rx.session.done.wait()
            for s in silent:
                await s.aclose()
    report = rx.outcome[0]
    assert isinstance(report, SessionReport), str(report)
    assert bytes(sink.data) == STATE
    assert report.channels_evicted == 1


# -- control channel ----------------------------------------------------------------------


async def test_silent_control_strangers_do_not_lock_out_the_vmm(tmp_path: Path) -> None:
    sink = MemorySink()
    with trio.fail_after(20):
        async with running_receiver(
            tmp_path, [(IDSTR, 0, sink)], gate="open", control_tcp=True, control_pending=2
        ) as rx:
            host, port = rx.control_address[4:].rsplit(":", 1)
            silent = [await trio.open_tcp_stream(host, int(port)) for _ in range(6)]
            await wait_for(lambda: rx.control.admission.statistics().evicted == 4, "evictions")
            async with open_control_client(rx.control_address) as vmm:
                await vmm.hello()  # gets a place: the strangers never took one
                async with trio.open_nursery() as nursery:
                    for data in streams():
                        nursery.start_soon(send_channel, rx.data_address, data)
                assert (await expect(vmm, "config"))["data"] == CONFIG
                assert (await expect(vmm, "done"))["ok"] is True
            for s in silent:
                await s.aclose()
    report = rx.outcome[0]
    assert isinstance(report, SessionReport), str(report)
    assert bytes(sink.data) == CONTROL_STATE
    assert report.control_evicted >= 4
    assert report.to_json()["control_evicted"] == report.control_evicted


async def test_progress_events_count_the_strangers(tmp_path: Path) -> None:
    sink = MemorySink()
    with trio.fail_after(20):
        async with running_receiver(
            tmp_path, [(IDSTR, 0, sink)], handshake_timeout=30, max_pending=1
        ) as rx:
            async with open_control_client(rx.control_address) as vmm:
                await vmm.hello()
                host, port = rx.data_address[4:].rsplit(":", 1)
                strangers = [await trio.open_tcp_stream(host, int(port)) for _ in range(3)]
                bad = await trio.open_tcp_stream(host, int(port))
                await bad.send_all(encode_handshake(bytes(16), 0))  # wrong uuid
                while True:
                    event = await expect(vmm, "progress")
                    if event["channels_evicted"] >= 2 and event["channels_refused"] >= 1:
                        break
                assert event["control_refused"] == 0 and event["control_evicted"] == 0
                await vmm.abort("enough")
                await expect(vmm, "done")
            for s in [*strangers, bad]:
                await s.aclose()


# -- accept errors ----------------------------------------------------------------------


class _ShortListener:
    """A listener whose accept fails with ``code`` ``failures`` times, then succeeds."""

    def __init__(self, code: int, failures: int) -> None:
        self.code = code
        self.failures = failures
        self.calls = 0

    async def accept(self) -> str:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.code, "no")
        return "stream"


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
async def test_accept_waits_out_a_shortage_and_logs_it_once(
    code: int, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    admission = Admission(4)
    listener = _ShortListener(code, 50)
    with caplog.at_level(logging.WARNING, logger="vfiomig"):
        assert await admission.accept(listener) == "stream"  # type: ignore[arg-type]
        listener.failures = 61  # ten more failures, within the burst
        assert await admission.accept(listener) == "stream"  # type: ignore[arg-type]
        assert len(caplog.records) == 1  # the burst started; it has not ended yet
        await trio.sleep(BURST_GAP)
        assert await admission.accept(listener) == "stream"  # type: ignore[arg-type]
    assert admission.statistics().accept_errors == 60
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # one when the burst starts, one when it ends
    assert errno.errorcode[code] in lines[0]
    assert lines[1] == "accepting again after 60 failed accepts over 5.9 s"
    events = [getattr(r, "event", None) for r in caplog.records]  # --log-format json
    assert events == ["accept_burst_start", "accept_burst_end"]


async def test_accept_evicts_pending_connections_to_free_fds(
    autojump_clock: trio.abc.Clock,
) -> None:
    admission = Admission(40, floor=10)
    tickets = [admission.enter(f"c{i}") for i in range(12)]
    await trio.sleep(1)
    for t in tickets[-2:]:
        t.note(5)
    assert await admission.accept(_ShortListener(errno.EMFILE, 1)) == "stream"  # type: ignore[arg-type]
    # The burst started: RESERVE connections went, silent the longest (then oldest) first.
    assert [t.evicted for t in tickets] == [True] * RESERVE + [False] * (12 - RESERVE)
    assert tickets[0].evictable().cancel_called  # the owner's next step is cancelled at once
    assert admission.max_pending == 10  # lowered to what it holds, not below its floor
    stats = admission.statistics()
    assert (stats.pending, stats.evicted, stats.accept_errors) == (4, RESERVE, 1)
    more = [admission.enter(f"d{i}") for i in range(7)]
    assert admission.statistics().pending == 10 and tickets[8].evicted and not more[0].evicted


async def test_other_accept_errors_are_raised() -> None:
    with pytest.raises(OSError, match="no"):
        await Admission(1).accept(_ShortListener(errno.EBADF, 1))  # type: ignore[arg-type]


async def test_refusals_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    admission = Admission(4)
    with caplog.at_level(logging.WARNING, logger="vfiomig"):
        for i in range(100):
            admission.refuse(None, f"channel {i}", "bad uuid")
        await trio.sleep(6)
        admission.refuse(None, "channel 100", "bad uuid")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "channel 0: refused: bad uuid",
        "channel 100: refused: bad uuid (and 99 more like it since the last such line)",
    ]
    assert [(r.event, r.fields) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("connection_refused", {"skipped": 0}),
        ("connection_refused", {"skipped": 99}),
    ]
    assert admission.statistics().refused == 101


def test_eviction_order_is_silence_then_bytes_then_age() -> None:
    async def main() -> None:
        admission = Admission(3)
        a, b, c = (admission.enter(x) for x in "abc")
        await trio.sleep(EVICT_GRACE)  # all out of their grace
        b.note(1)  # b spoke last: kept longest
        # a and c are equally silent (both at their accept time, the same clock reading
        # here), neither sent a byte: the older goes first.
        admission.enter("d")
        assert a.evicted and not (b.evicted or c.evicted)
        admission.enter("e")
        assert c.evicted and not b.evicted

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_connections_waiting_together_are_accepted_together() -> None:
    """Channels that connect at once are accepted in one go (no checkpoint per accept),
    at most ``max_pending`` at a time, and none is lost between bursts."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(7)]
    admission = Admission(5)
    with nonblocking_twin(listener) as twin:
        first = await admission.accept_burst(listener, twin)
        assert len(first) == 5  # every one was waiting; the cap is max_pending
        second = await admission.accept_burst(listener, twin)
        assert len(second) == 2
        peers = {s.socket.getpeername()[1] for s in first + second}
        assert peers == {c.socket.getsockname()[1] for c in clients}
        for s in first + second:
            await s.aclose()
    assert listener.socket.fileno() >= 0  # the twin's close left the listener open
    for c in clients:
        await c.aclose()
    await listener.aclose()


def _connect_now(rx) -> socket.socket:  # type: ignore[no-untyped-def]
    """A blocking connect, done without a checkpoint: the receiver sees it only at the
    test's next one (the kernel completes it from the listener's backlog)."""
    return socket.create_connection(rx.address)


async def test_a_flood_at_the_cap_never_evicts_a_channel_in_its_grace(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The real channel and strangers fill the pending places; more strangers arrive at
    once, before the real channel's handshake: with the clock stopped (all of them in
    their grace), none is evicted and the newcomers wait in the backlog. Once its
    handshake comes the real channel is admitted and a stranger takes its place; once
    the grace is over the strangers are evicted for the newcomers as before.

    Before the grace, the burst at the cap evicted every pending connection, the real
    one first (the oldest of equally silent ones): the migration failed under floods."""
    sink = MemorySink()
    packets = device_packets(idstr(0), 0, STATE, CONFIG, 1000)
    stream = channel_streams(packets, 1, UUID)[0]
    # Two channels, so that a stranger after the real one is not refused outright (all
    # channels set up); the real one carries every packet.
    async with receiver([sink], channels=2, max_pending=4, handshake_timeout=30) as rx:
        admission = rx.session.admission
        real = _connect_now(rx)
        strangers = [_connect_now(rx) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert admission.statistics().pending == 4
        strangers += [_connect_now(rx) for _ in range(4)]  # a burst at the cap
        await trio.testing.wait_all_tasks_blocked()
        stats = admission.statistics()
        assert (stats.pending, stats.evicted) == (4, 0)
        real.sendall(stream[:HANDSHAKE_SIZE])
        await trio.testing.wait_all_tasks_blocked()
        stats = admission.statistics()
        assert (stats.admitted, stats.pending, stats.evicted) == (1, 4, 0)
        mock_clock.jump(EVICT_GRACE)  # the strangers come out of their grace
        await trio.testing.wait_all_tasks_blocked()
        stats = admission.statistics()
        assert (stats.admitted, stats.pending, stats.evicted) == (1, 4, 3)
        real.sendall(stream[HANDSHAKE_SIZE:])
        real.shutdown(socket.SHUT_WR)
        await rx.session.done.wait()
    report = rx.outcome[0]
    assert isinstance(report, SessionReport), str(report)
    assert bytes(sink.data) == STATE
    real.close()
    for s in strangers:
        s.close()


def test_a_connection_with_bytes_unread_is_not_evicted() -> None:
    """Past its grace, a pending connection whose bytes wait unread in its socket (its
    owner has not run since they came) is not silent: the other one goes."""

    async def main() -> None:
        admission = Admission(2)
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        with a, b, c, d:
            busy = admission.enter("busy", trio.socket.from_stdlib_socket(a))
            idle = admission.enter("idle", trio.socket.from_stdlib_socket(c))
            assert admission.places() == 0  # both in their grace
            await trio.sleep(EVICT_GRACE)
            b.send(b"\x11\x22\x33\x44")  # for busy, not read yet
            assert admission.places() == 1
            admission.enter("new")
            assert idle.evicted and not busy.evicted
            assert admission.places() == 0  # busy is all that is past its grace

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_pending_connection_closed_by_its_owner_does_not_break_the_accept_loop() -> None:
    """A channel task closes its stream before it releases its ticket (the stream's aclose
    checkpoints in between), so the accept loop may look at a pending socket whose fileno
    is -1: `places` must count it as having nothing unread. (Found in a fresh-clone CI: the
    FIONREAD ioctl raised ValueError there, the accept loop died and the connection it had
    just accepted was left to the garbage collector, about 1 pure-core run in 3.)"""

    async def main() -> None:
        admission = Admission(1)
        a, b = socket.socketpair()
        with b:
            closed = admission.enter("closing", trio.socket.from_stdlib_socket(a))
            b.send(b"\x11")  # unread, then its owner closes it
            a.close()
            assert admission.places() == 0  # in its grace
            await trio.sleep(EVICT_GRACE)
            assert admission.places() == 1  # closed: nothing unread, evictable
            admission.enter("new")
            assert closed.evicted

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
