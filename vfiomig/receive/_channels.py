"""One task per data channel: handshake, framing, routing, backpressure.

A channel task promises, when it returns, that its stream is closed and that everything
it read was either handed to a reorder buffer or reported as an error. Handshake
failures refuse only this channel (but a channel id beyond the channel count fails the
session: the sender opens more channels than this receiver expects, and what they carry
can never come); any error after the handshake fails the session.

How it closes tells the sender the outcome (SPEC.md §5): a channel read to its end while
the session stands (or still open when every device is loaded) is closed in order (FIN);
a refused channel, and every channel of a failed session, is reset (RST), whatever its
buffers held, so that a sender waiting for the close after its last byte cannot take a
refusal for success.
Until its handshake is accepted a channel is pending (`vfiomig.transport.Admission`):
an eviction ends it then, and nothing it sent reaches a device.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from vfiomig._core import (
    NEED_DATA,
    PUMP_END,
    PUMP_HEADER,
    PUMP_NEED_DATA,
    PUMP_WOULD_BLOCK,
    ChannelHello,
    Framer,
    HandshakeError,
    ReorderBuffer,
    StreamIncompleteError,
    VfioMigError,
    new_payload_buffer,
)
from vfiomig._core._errors import ChannelCountError
from vfiomig._core._wire import device_name
from vfiomig._logs import event
from vfiomig.receive._loader import wake_loader
from vfiomig.receive._session import Device, Session
from vfiomig.transport import Pending, reset_on_close

log = logging.getLogger("vfiomig")

#: Bytes asked of the socket per receive. Small packets come many to a receive; the data of
#: a large packet bypasses this buffer and is received straight into its own buffer.
RECEIVE_SIZE = 256 * 1024

#: Bytes a channel receives in one `Framer.pump_recv` call before it lets other tasks run
#: (the loaders, the other channels).
PUMP_LIMIT = 1 << 20

#: Inside a packet's data, a TCP channel asks to be woken only once this much of what the
#: packet still needs has arrived (SO_RCVLOWAT), or all of it if less: a wakeup costs tens
#: of microseconds of Python, and a fast link otherwise wakes the task for each segment.
#: Below `LOWAT_MIN` still needed it is not worth a setsockopt.
LOWAT_CAP = 512 * 1024
LOWAT_MIN = 64 * 1024


async def run_channel(session: Session, stream: trio.abc.Stream, ticket: Pending) -> None:
    """Serve one accepted data channel until it ends or the session is cancelled.

    ``ticket`` is the channel's pending entry in ``session.admission``: admitted once the
    handshake is accepted, refused when it is not; eviction ends it.

    Cancellation: the stream is closed on the way out; a packet being read is dropped
    (the session has failed or finished when a channel is cancelled).
    """
    cfg = session.config
    admission = session.admission
    label = ticket.label
    framer = Framer(
        uuid=cfg.uuid,
        channels=cfg.channels,
        packet_cap=cfg.packet_cap,
        ram_page_count=cfg.ram_page_count,
        endian=cfg.endian,
        label=label,
    )
    sock = getattr(stream, "socket", None)
    recv_into = sock.recv_into if isinstance(stream, trio.SocketStream) and sock else None
    registered = False

    async def fill() -> int:
        if recv_into is not None:
            n: int = await recv_into(framer.get_buffer(RECEIVE_SIZE))
            framer.commit(n)
            return n
        data = await stream.receive_some(RECEIVE_SIZE)
        framer.feed(data)
        return len(data)

    try:
        async with stream:
            hello = None
            try:
                hello = await _handshake(session, framer, fill, ticket)
                if hello is not None:
                    admission.admit(ticket)
                    session.channel_ids.add(hello.channel_id)
                    session.channels_accepted += 1
                    session.channels_open += 1
                    registered = True
                    log.info(
                        "channel %d: accepted from %s",
                        hello.channel_id,
                        label,
                        extra=event("channel_accepted", peer=label, channel=hello.channel_id),
                    )
                    await _read_packets(session, framer, fill, recv_into, sock)
            finally:
                # Refused, or the session failed: reset. Read to its end, or cancelled
                # because every device is loaded (its end may still be on the way): FIN.
                if hello is None or session.failed:
                    reset_on_close(stream)
    except VfioMigError as exc:
        session.fail(exc)
    except (OSError, trio.BrokenResourceError) as exc:
        cur = framer.current
        if cur is not None:
            name = device_name(cur.idstr, cur.instance)
            session.fail(
                StreamIncompleteError(
                    f"{name}: channel {framer.channel_id} broke inside packet idx {cur.idx}: {exc}",
                    device=name,
                    idx=cur.idx,
                )
            )
        else:
            log.warning(
                "%s: connection lost between packets: %s",
                label,
                exc,
                extra=event("channel_lost", peer=label, reason=str(exc)),
            )
    finally:
        admission.release(ticket)
        if registered:
            session.channels_open -= 1
            channel_closed(session)


async def _handshake(
    session: Session, framer: Framer, fill: Callable[[], Awaitable[int]], ticket: Pending
) -> ChannelHello | None:
    """The channel's handshake, bounded in time: its hello, or None when it was refused
    (a refusal closes only this channel, but for a channel id beyond the count)."""
    cfg = session.config
    admission = session.admission
    label = ticket.label
    ev = None
    try:
        with ticket.evictable(), trio.fail_after(cfg.handshake_timeout):
            while (ev := framer.next_event()) is NEED_DATA:
                ticket.note(await fill())
    except trio.TooSlowError:
        admission.refuse(ticket, label, f"no handshake within {cfg.handshake_timeout:g} s")
        return None
    except ChannelCountError as exc:
        admission.refuse(ticket, label, str(exc))
        session.fail(exc)
        return None
    except (HandshakeError, StreamIncompleteError) as exc:
        admission.refuse(ticket, label, str(exc))
        return None
    except (OSError, trio.BrokenResourceError) as exc:  # e.g. a reset
        admission.refuse(ticket, label, f"connection lost during the handshake: {exc}")
        return None
    if ticket.evicted:
        return None
    assert isinstance(ev, ChannelHello)
    if ev.channel_id in session.channel_ids:
        admission.refuse(ticket, label, f"channel id {ev.channel_id} already set up")
        return None
    return ev


async def _read_packets(session: Session, framer: Framer, fill, recv_into, sock) -> None:  # type: ignore[no-untyped-def]
    room = session.room
    # A plain socket: the core receives for itself (`Framer.pump_recv`), as much as the
    # socket has, and this task only sleeps until it is readable again. TLS goes through
    # the stream, a receive at a time (`Framer.pump`).
    recv_now = _nonblocking_recv(sock.fileno()) if recv_into is not None else None
    lowat = 1 if recv_now is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else 0
    trace = log.isEnabledFor(logging.DEBUG)  # checked once, not per packet
    # Devices whose packets the core takes whole, many per call (`Framer.pump`): a device
    # joins after its first packet on this channel went through the slow path below, so
    # that path alone routes unknown devices, starts the clock and parks for budget. With
    # tracing on, none joins: every packet comes here and is logged.
    routes: dict[tuple[str, int], ReorderBuffer] = {}
    pumped: list[Device] = []
    while True:
        if recv_now is not None:
            status, done, ev = framer.pump_recv(recv_now, routes, PUMP_LIMIT)
        else:
            status, done, ev = framer.pump(routes)
        if done:
            session.progress += done
            # The loader re-checks take_ready() before it parks (no await in between), so
            # only a parked loader needs a wakeup (or its batches written from here, see
            # `wake_loader`); one check per call, not per packet.
            for dev in pumped:
                wake_loader(session, dev)
        if status == PUMP_WOULD_BLOCK:
            if lowat:
                # The bytes the packet in progress still needs will come (or the stream
                # breaks, which wakes the task anyway), so waiting for them cannot stall.
                want = framer.payload_remaining - framer.buffered
                want = min(want, LOWAT_CAP) if want >= LOWAT_MIN else 1
                if want != lowat:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                        lowat = want
                    except OSError:  # a kernel without it for this socket: wait as before
                        lowat = 0
            await trio.lowlevel.wait_readable(sock)
            continue
        if status == PUMP_NEED_DATA:
            if recv_now is not None:
                await trio.lowlevel.checkpoint()  # PUMP_LIMIT bytes in: let others run
            else:
                await fill()
            continue
        if status == PUMP_END:
            return
        assert ev is not None
        device = session.route(ev.idstr, ev.instance, ev.idx)
        buf = device.buf
        if status == PUMP_HEADER:
            # Backpressure: read the data only once the buffer accepts it. While parked this
            # task does not read its socket, so TCP flow control slows the sender.
            while not buf.offer(ev.version, ev.idx, ev.flags, ev.size):
                await room.park()
        if device.first_packet is None:
            device.first_packet = trio.current_time()
            session.mark_started()
        size = ev.size
        if recv_now is not None and size and not trace:
            # Its data comes through the pump, like the packets the pump accepts itself
            # (a trio receive per segment cost more than the copy it makes).
            framer.defer_payload(buf)
        else:
            if size == 0:
                data: bytes | bytearray = b""
            else:
                taken = framer.take_payload()
                if taken is not None:
                    data = taken
                else:
                    data = await _read_payload(framer, size, fill, recv_into)
            buf.deliver(ev.idx, data)
            if trace:
                log.debug(
                    "%s: packet incoming idx %d flags %#x size %d",
                    device.name,
                    ev.idx,
                    ev.flags,
                    ev.size,
                    extra=event(
                        "vfio_load_state_device_buffer_incoming",
                        device.name,
                        idx=ev.idx,
                        flags=ev.flags,
                        size=ev.size,
                    ),
                )
            session.progress += 1
            wake_loader(session, device)
        if not trace and (device.idstr, device.instance) not in routes:
            routes[device.idstr, device.instance] = buf
            pumped.append(device)


async def _read_payload(framer: Framer, size: int, fill, recv_into) -> bytearray:  # type: ignore[no-untyped-def]
    payload = new_payload_buffer(size)  # filled whole below; the C core skips the zero-fill
    view = memoryview(payload)
    got = framer.read_payload_into(view)
    while got < size:
        if recv_into is not None and framer.buffered == 0:
            # Receive the rest of a large packet straight into its own buffer: no copy.
            n = await recv_into(view[got:])
            if n == 0:
                raise framer.fail_truncated()
            framer.consume_external(n)
            got += n
        else:
            await fill()
            got += framer.read_payload_into(view[got:])
    view.release()
    return payload


def _nonblocking_recv(fd: int) -> Callable[[memoryview], int]:
    """``recv_into`` for `Framer.pump_recv` on trio's (non-blocking) socket ``fd``."""

    def recv_now(view: memoryview) -> int:
        return os.readv(fd, (view,))

    return recv_now


def channel_closed(session: Session) -> None:
    """A data channel ended: when none is left, fail the devices still missing packets."""
    if session.channels_open or session.done.is_set():
        return
    if session.channels_accepted >= session.config.channels:
        check_missing(session, "every channel ended")


def check_missing(session: Session, why: str) -> None:
    """No more packets can come: fail every device that still misses some.

    A device whose loader has packets before the first gap still to write fails once they
    are written (the loader checks `Device.input_ended` before it parks): failing it now
    would throw them away, and its sink is to hold the stream up to the first missing idx.
    """
    for device in session.devices.values():
        if device.loaded_at is None and device.error is None and not device.buf.complete:
            if device.buf.has_ready():
                device.input_ended = why
                device.lot.unpark_all()
            else:
                session.fail(device.buf.incomplete_error(why), device)
