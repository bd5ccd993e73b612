"""The receiver's control channel (SPEC.md §3): commands in, events out, fds by SCM_RIGHTS.

`ControlServer.serve` is an extra task of a receive session (see ``_service.ExtraTask``):
it listens on one address, accepts control connections and serves each with a reader
(commands, decoded by `vfiomig.control._proto.ControlDecoder`) and a writer (events).

Several connections: up to ``max_connections`` at once (default 4); every connection may
send commands and every connection that sent a valid message gets every event, so a VMM
and a monitor can both watch. A command's ``error`` reply goes only to the connection
that sent it. No ``hello`` is required before other commands; a ``hello`` with another
version gets an ``error``. Events start after the reply to a connection's first message:
a peer that (re)connects and says ``hello`` reads the reply first, whatever the session
broadcast meanwhile (``done`` at the end goes to every connection).

Strangers: a connection is pending (`vfiomig.transport.Admission`) until it sent its first
valid message; only then does it take one of the ``max_connections`` places. Pending
connections are bounded by ``max_pending`` (default 8): at the limit, the one silent the
longest is evicted (past its grace, `vfiomig.transport.Admission`), so connections that
never speak cannot lock the VMM out. A monitor
that only listens sends a ``hello`` first (it gets no events before, and may be evicted
under a flood).

Config blobs (`config_target`): delivered as ``config`` events by a `ConfigHandover`
(`vfiomig.control._config`): only to connections that sent a valid message, kept for one
that (re)connects (after the reply to its first message), bounded by the stall timeout.

Ending: when the session ends (every device loaded, a failure, or a cancel), this task
keeps running, shielded, for at most ``flush_timeout`` seconds: it sends each connection
the events still queued and ``done``, then closes it.
"""

from __future__ import annotations

import logging
import math
import socket as stdsocket
import ssl
from typing import Any

import trio

from vfiomig._core._errors import PacketError, SinkError
from vfiomig._logs import event
from vfiomig.control import _proto as proto
from vfiomig.control._attach import AttachSink
from vfiomig.control._config import ConfigHandover
from vfiomig.control._connection import (
    RECEIVE_SIZE,
    Connection,
    Out,
    admits,
    error_event,
    recv_with_fds,
)
from vfiomig.receive import Device, DeviceSetup, ExtraTask, Session, SessionEvent
from vfiomig.sinks import ConfigTarget
from vfiomig.transport import (
    Admission,
    Listener,
    MeteredStream,
    close_fds,
    listener_kind,
    open_listener,
    parse_address,
    peer_label,
)

log = logging.getLogger("vfiomig")

#: Control connections that have not sent a valid message yet, at most (by default).
DEFAULT_MAX_PENDING = 8


class ControlServer:
    """The control channel of one receive session.

    Args:
        address: ``unix:PATH`` (fds can travel) or ``tcp:HOST:PORT``.
        tls: a server context for TCP connections (UNIX connections stay plain).
        max_connections: control connections served at once, counting those that sent a
            valid message; more are refused.
        max_pending: connections that have not sent a valid message yet, at most; at the
            limit the one silent the longest is evicted.
        handshake_timeout: bound on a TLS handshake.
        flush_timeout: how long the final events may take once the session ended.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 4,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_message: int = proto.DEFAULT_MAX_MESSAGE,
        progress_interval: float = 0.5,
        handshake_timeout: float = 10.0,
        flush_timeout: float = 5.0,
    ) -> None:
        self.address = parse_address(address)
        self.tls = tls if listener_kind(self.address) == "tcp" else None
        self.max_connections = max_connections
        self.max_message = max_message
        self.progress_interval = progress_interval
        self.handshake_timeout = handshake_timeout
        self.flush_timeout = flush_timeout
        self.bound: str | None = None
        self.admission = Admission(max_pending, prefix="control: ")
        self._conns: set[Connection] = set()
        self._established = 0  # connections admitted and not yet closed
        self.configs = ConfigHandover(self._admitted, lambda: self._stall_timeout)
        self._finishing = trio.Event()
        self._done: Out | None = None  # the final event, once the session ended
        self._stops: list[trio.CancelScope] = []  # the accept and progress loops
        self._session: Session | None = None

    @property
    def refused(self) -> int:
        """Connections refused so far (no room, garbage before a valid message)."""
        return self.admission.statistics().refused

    def connection_counts(self) -> dict[str, int]:
        """The control connections refused and evicted so far (session report fields)."""
        st = self.admission.statistics()
        return {"control_refused": st.refused, "control_evicted": st.evicted}

    def config_target(self, setup: DeviceSetup) -> ConfigTarget:
        """The config target sending ``setup``'s blob as a ``config`` event."""
        return self.configs.target(setup)

    def _admitted(self) -> list[Connection]:
        return [c for c in self._conns if c.admitted]

    @property
    def _stall_timeout(self) -> float:
        return self._session.config.stall_timeout if self._session is not None else 30.0

    # -- the session task ----------------------------------------------------------------

    async def serve(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, serve connections, and report the session's end to every connection.

        Cancellation: a cancel (the session ended) starts the final flush, shielded and
        bounded by ``flush_timeout``; then the cancel propagates.
        """
        listener, bound = await open_listener(self.address)
        self.bound = str(bound)
        self._session = session
        session.counters.append(self.connection_counts)
        session.listeners.append(self._on_event)
        log.info(
            "control: listening on %s",
            self.bound,
            extra=event("control_listening", address=self.bound),
        )
        task_status.started()
        shield = trio.CancelScope(shield=True)
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._watch_end, shield)
                with shield:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._accept_loop, listener, nursery)
                        nursery.start_soon(self._progress_loop, session)
                        await self._finishing.wait()
                        for scope in self._stops:  # no new connections, no more progress
                            scope.cancel()
                        self._finish(session)
                        # The nursery ends when every connection's writer has sent the
                        # final events and closed; the shield's deadline bounds that.
        finally:
            session.listeners.remove(self._on_event)
            with trio.CancelScope(shield=True):
                await listener.aclose()

    async def _watch_end(self, shield: trio.CancelScope) -> None:
        try:
            await trio.sleep_forever()
        finally:
            # The session's scope was cancelled: the shielded part now has a deadline.
            shield.deadline = trio.current_time() + self.flush_timeout
            self._finishing.set()

    def _finish(self, session: Session) -> None:
        ok = not session.failed and all(d.loaded_at is not None for d in session.devices.values())
        self._done = Out(proto.encode({"type": "done", "ok": ok}))
        for conn in list(self._conns):
            self._end_connection(conn, self._done)

    @staticmethod
    def _end_connection(conn: Connection, done: Out) -> None:
        """The session ended: ``conn`` gets its queued events and ``done``, then closes."""
        conn.queue(done)
        conn.send.close()
        conn.reader.cancel()

    async def _accept_loop(self, listener: Listener, nursery: trio.Nursery) -> None:
        with trio.CancelScope() as stop:
            self._stops.append(stop)
            async with listener:
                await self._accept_connections(listener, nursery)

    async def _accept_connections(self, listener: Listener, nursery: trio.Nursery) -> None:
        while True:
            stream = await self.admission.accept(listener)
            label = peer_label(stream, "connection")
            if self._established >= self.max_connections:
                self.admission.refuse(
                    None,
                    label,
                    f"{self._established} connections open (limit {self.max_connections})",
                )
                msg = proto.encode(
                    {
                        "type": "error",
                        "message": f"too many control connections ({self.max_connections})",
                    }
                )
                with trio.move_on_after(1):
                    try:
                        await stream.send_all(msg)
                    except trio.BrokenResourceError:
                        pass
                await stream.aclose()
                continue
            send, receive = trio.open_memory_channel[Out](math.inf)
            conn = Connection(
                stream, label, send, receive, self.admission.enter(label, stream.socket)
            )
            self._conns.add(conn)
            nursery.start_soon(self._serve_connection, conn)
            if self._done is not None:
                # Accepted as the session ended: trio's accept returns a connection it
                # took even when cancelled meanwhile, after `_finish` ran, which would
                # have left this one open until the flush deadline.
                self._end_connection(conn, self._done)

    def _admit(self, conn: Connection) -> bool:
        """``conn`` sent its first valid message: give it a place, if one is free."""
        if self._established >= self.max_connections:
            why = f"too many control connections ({self.max_connections})"
            self.admission.refuse(conn.ticket, conn.label, why)
            conn.queue(Out(proto.encode({"type": "error", "message": why})))
            return False
        self.admission.admit(conn.ticket)
        self._established += 1
        conn.admitted = True
        return True

    async def _serve_connection(self, conn: Connection) -> None:
        """Serve ``conn`` until it ends; an eviction (``conn.ticket``) ends it too."""
        try:
            with conn.ticket.evictable():
                if self.tls is not None:
                    conn.stream = await self._tls_handshake(conn)
                log.info(
                    "control: %s connected",
                    conn.label,
                    extra=event("control_connected", peer=conn.label),
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_loop, conn, nursery.cancel_scope)
                    await self._write_loop(conn)
                    nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, OSError, PacketError) as exc:
            self._ended(conn, "dropped", exc)
        finally:
            self.admission.release(conn.ticket)
            if conn.admitted:
                self._established -= 1
            self._conns.discard(conn)
            conn.send.close()
            with trio.CancelScope(shield=True):
                await conn.stream.aclose()
            log.info(
                "control: %s closed", conn.label, extra=event("control_closed", peer=conn.label)
            )

    async def _tls_handshake(self, conn: Connection) -> trio.SSLStream[trio.abc.Stream]:
        assert self.tls is not None
        metered: trio.abc.Stream = MeteredStream(conn.stream, conn.ticket)
        stream = trio.SSLStream(metered, self.tls, server_side=True)
        with trio.move_on_after(self.handshake_timeout) as scope:
            await stream.do_handshake()
        if scope.cancelled_caught:
            raise PacketError(f"no tls handshake within {self.handshake_timeout:g} s")
        return stream

    async def _write_loop(self, conn: Connection) -> None:
        # Ends when the queue is closed and drained (the session ended or the reader hit a
        # framing error), or when the peer went away.
        try:
            async for out in conn.receive:
                await conn.stream.send_all(out.data)
                if out.delivered is not None:
                    out.delivered.set()
        except (trio.BrokenResourceError, OSError) as exc:
            self._ended(conn, "lost", exc)

    def _ended(self, conn: Connection, how: str, exc: BaseException) -> None:
        """``conn`` ended by ``exc``: ``dropped`` (we ended it) or ``lost`` (the peer went
        away). A client's end is a warning (event ``control_<how>``); a stranger's is
        counted, and logged throttled."""
        if conn.admitted:
            log.warning(
                "control: %s %s: %s",
                conn.label,
                how,
                exc,
                extra=event(f"control_{how}", peer=conn.label, reason=str(exc)),
            )
        else:
            self.admission.refuse(
                conn.ticket, conn.label, f"lost: {exc}" if how == "lost" else str(exc)
            )

    async def _read_loop(self, conn: Connection, connection_scope: trio.CancelScope) -> None:
        decoder = proto.ControlDecoder(max_message=self.max_message)
        sock = conn.stream.socket if isinstance(conn.stream, trio.SocketStream) else None
        with conn.reader:
            try:
                while True:
                    fds: list[int] = []
                    if sock is not None and sock.family == stdsocket.AF_UNIX:
                        data: bytes | bytearray = await recv_with_fds(sock, fds, conn.label)
                    else:
                        data = await conn.stream.receive_some(RECEIVE_SIZE)
                    conn.ticket.note(len(data))
                    try:
                        decoder.feed(data, fds)
                        while (msg := decoder.next_message()) is not None:
                            self._close_orphans(conn, decoder.orphans)
                            if conn.admitted or not admits(msg):
                                self._handle(conn, msg)
                                continue
                            if not self._admit(conn):
                                conn.send.close()  # the writer sends the error, then ends
                                return
                            # The reply to its first message (hello) first, then the
                            # config events it missed.
                            self._handle(conn, msg)
                            self.configs.replay(conn)
                    except proto.ControlMessageError as exc:
                        self._close_orphans(conn, decoder.orphans)
                        self._reply_error(conn, str(exc))
                        continue
                    if not data and not conn.admitted:
                        # A stranger that never spoke: nothing to keep its fd open for.
                        self.admission.refuse(conn.ticket, conn.label, "eof before a message")
                        connection_scope.cancel()
                        return
                    if not data:
                        # The peer finished sending; it may still be reading events.
                        log.info(
                            "control: %s sent eof",
                            conn.label,
                            extra=event("control_eof", peer=conn.label),
                        )
                        return
            except proto.ControlFramingError as exc:
                self._reply_error(conn, str(exc))
                self._ended(conn, "dropped", exc)
                conn.send.close()  # the writer sends the error, then the connection ends
            except (trio.BrokenResourceError, OSError) as exc:
                self._ended(conn, "lost", exc)
                connection_scope.cancel()
            finally:
                self._close_orphans(conn, decoder.orphans)
                self._close_orphans(conn, decoder.pending_fds)

    def _close_orphans(self, conn: Connection, fds: list[int]) -> None:
        """Close the fds no ``attach-fd`` of ``conn`` claimed (and empty ``fds``)."""
        if not fds:
            return
        log.warning(
            "control: %s: closed %d fd(s) that no attach-fd claimed",
            conn.label,
            len(fds),
            extra=event("control_fds_unclaimed", peer=conn.label, count=len(fds)),
        )
        close_fds(fds)

    # -- commands ----------------------------------------------------------------------

    def _handle(self, conn: Connection, msg: proto.Message) -> None:
        session = self._session
        assert session is not None
        if isinstance(msg, proto.Hello):
            if msg.version != proto.VERSION:
                self._reply_error(
                    conn, f"control version {msg.version} is not supported ({proto.VERSION})"
                )
                return
            devices = [
                {"device": d.idstr, "instance": d.instance} for d in session.devices.values()
            ]
            conn.queue(
                Out(
                    proto.encode(
                        {
                            "type": "hello",
                            "version": proto.VERSION,
                            "channels": session.config.channels,
                            "devices": devices,
                        }
                    )
                )
            )
        elif isinstance(msg, proto.Precopy):
            device = self._device(conn, msg.device, msg.instance, "precopy")
            if device is not None:
                ev = event("control_precopy", device.name, bytes=len(msg.data))
                log.debug("%s: precopy %d bytes", device.name, len(msg.data), extra=ev)
                session.add_precopy(device, msg.data)
        elif isinstance(msg, proto.DataComplete):
            device = self._device(conn, msg.device, msg.instance, "data-complete")
            if device is not None:
                session.open_gate(device)
        elif isinstance(msg, proto.SwitchoverStart):
            log.info("control: switchover-start", extra=event("control_switchover_start"))
            session.open_all_gates()
        elif isinstance(msg, proto.AttachFd):
            self._attach(conn, msg)
        elif isinstance(msg, proto.Abort):
            log.warning(
                "control: %s asked to abort: %s",
                conn.label,
                msg.reason,
                extra=event("control_abort", peer=conn.label, reason=msg.reason),
            )
            session.abort(msg.reason)
        else:
            self._reply_error(conn, f"control message type {msg.type!r} is unknown")

    def _attach(self, conn: Connection, msg: proto.AttachFd) -> None:
        fds = list(msg.fds)
        try:
            device = self._device(conn, msg.device, msg.instance, "attach-fd")
            if device is None:
                return
            if len(fds) != 1:
                self._reply_error(
                    conn, f"{device.name}: attach-fd carried {len(fds)} fds (expected 1)", device
                )
                return
            sink = device.setup.sink
            if not isinstance(sink, AttachSink):
                self._reply_error(
                    conn,
                    f"{device.name}: attach-fd for a device whose sink is {sink.description} "
                    "(expected attach:)",
                    device,
                )
                return
            try:
                sink.attach(fds[0], msg.kind)
            except SinkError as exc:
                self._reply_error(conn, f"{device.name}: attach-fd refused: {exc}", device)
                return
            fds.pop()
            log.info(
                "%s: attached %s fd",
                device.name,
                msg.kind,
                extra=event("control_attach_fd", device.name, kind=msg.kind),
            )
        finally:
            close_fds(fds)

    def _device(self, conn: Connection, idstr: str, instance: int, what: str) -> Device | None:
        assert self._session is not None
        device = self._session.devices.get((idstr, instance))
        if device is None:
            self._reply_error(conn, f"{what} for unknown device {idstr!r} instance {instance}")
        return device

    def _reply_error(self, conn: Connection, message: str, device: Device | None = None) -> None:
        # What a stranger is told is not the operator's business (its refusal is logged).
        log.log(
            logging.WARNING if conn.admitted else logging.DEBUG,
            "control: %s: %s",
            conn.label,
            message,
            extra=event("control_error_reply", device.name if device else None, peer=conn.label),
        )
        conn.queue(Out(proto.encode(error_event(message, device))))

    # -- events ------------------------------------------------------------------------

    def _broadcast(self, out: Out) -> None:
        for conn in self._conns:
            if conn.admitted:
                conn.queue(out)

    def _on_event(self, event: SessionEvent) -> None:
        device = event.device
        if event.kind == "error":
            self._broadcast(Out(proto.encode(error_event(event.message, device))))
        elif event.kind == "loaded" and device is not None:
            st = device.buf.statistics()
            start = device.first_packet
            if start is None and self._session is not None:
                start = self._session.started_at
            end = device.loaded_at if device.loaded_at is not None else trio.current_time()
            msg = {
                "type": "loaded",
                "device": device.idstr,
                "instance": device.instance,
                "bytes": st.written_bytes,
                "packets": st.written_packets,
                "seconds": float(end - (start if start is not None else end)),
            }
            self._broadcast(Out(proto.encode(msg)))

    async def _progress_loop(self, session: Session) -> None:
        last: dict[str, tuple[int, ...]] = {}
        with trio.CancelScope() as stop:
            self._stops.append(stop)
            await self._progress_ticks(session, last)

    async def _progress_ticks(self, session: Session, last: dict[str, tuple[int, ...]]) -> None:
        while True:
            await trio.sleep(self.progress_interval)
            if not self._conns:
                continue
            counts = session.connection_counts()  # strangers turned away, for the VMM
            for device in session.devices.values():
                if device.loaded_at is not None or device.error is not None:
                    continue
                st = device.buf.statistics()
                now = (st.written_bytes, st.queued_bytes, st.next_idx, *counts.values())
                if last.get(device.name) == now:
                    continue
                last[device.name] = now
                msg = {
                    "type": "progress",
                    "device": device.idstr,
                    "instance": device.instance,
                    "written": st.written_bytes,
                    "queued": st.queued_bytes,
                    "next_idx": st.next_idx,
                    **counts,
                }
                self._broadcast(Out(proto.encode(msg), droppable=True))


def control_task(address: str, **options: Any) -> ExtraTask:
    """An extra task for `serve_receiver` serving the control channel at ``address``.

    Its config blobs cannot reach the control channel (use `ControlServer` and its
    ``config_target`` for that); ``options`` go to `ControlServer`.
    """
    return ControlServer(address, **options).serve


__all__ = ["ControlServer", "control_task"]
