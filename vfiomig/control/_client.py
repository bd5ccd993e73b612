"""A client of the control channel (SPEC.md §3): what a VMM or ``vfiomig send`` speaks.

    async with open_control_client("unix:/run/vfiomig/ctl") as ctl:
        info = await ctl.hello()
        await ctl.attach_fd("0000:00:04.0/vfio", 0, device_fd, "vfio-device")
        await ctl.switchover_start()
        async for event in ctl.events():
            if event["type"] == "done":
                break

Events are the receiver's msgpack maps, as dicts. `events` yields every event not
consumed by `hello`. Sends are serialised by a lock, so an fd always travels with the
first byte of its own message.
"""

from __future__ import annotations

import array
import socket as stdsocket
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio

from vfiomig._core._errors import PacketError, UsageError
from vfiomig.control import _proto as proto
from vfiomig.transport import connect, parse_address

RECEIVE_SIZE = 256 * 1024


class ControlClient:
    """One control connection. Build it with `open_control_client`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._lock = trio.Lock()
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=2 * proto.DEFAULT_MAX_MESSAGE)
        self._backlog: deque[dict[str, Any]] = deque()
        self._eof = False

    # -- commands ------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message as it is (tests use it for invalid messages too)."""
        await self.send_raw(proto.encode(message))

    async def send_raw(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send_all(data)

    async def hello(self) -> dict[str, Any]:
        """Send ``hello`` and return the receiver's ``hello`` (other events are kept).

        Raises:
            PacketError: the receiver answered with an ``error`` or closed the connection.
        """
        await self.send({"type": "hello", "version": proto.VERSION})
        kept: list[dict[str, Any]] = []  # for next_event, after what the backlog holds
        try:
            while True:
                event = await self._read()  # not _next: the backlog holds no reply
                if event is None:
                    raise PacketError("control connection closed before the hello reply")
                if event.get("type") == "hello":
                    return event
                if event.get("type") == "error" and "device" not in event:
                    raise PacketError(f"hello refused: {event.get('message')}")
                kept.append(event)
        finally:
            self._backlog.extend(kept)

    async def precopy(self, device: str, instance: int, data: bytes) -> None:
        await self.send({"type": "precopy", "device": device, "instance": instance, "data": data})

    async def data_complete(self, device: str, instance: int) -> None:
        await self.send({"type": "data-complete", "device": device, "instance": instance})

    async def switchover_start(self) -> None:
        await self.send({"type": "switchover-start"})

    async def abort(self, reason: str) -> None:
        await self.send({"type": "abort", "reason": reason})

    async def attach_fd(self, device: str, instance: int, fd: int, kind: str) -> None:
        """Send ``attach-fd`` with ``fd`` as SCM_RIGHTS (the caller keeps its own fd).

        Raises:
            UsageError: the connection is not a UNIX socket.
        """
        msg = {"type": "attach-fd", "device": device, "instance": instance, "kind": kind}
        await self.send_with_fds(proto.encode(msg), [fd])

    async def send_with_fds(self, data: bytes, fds: list[int]) -> None:
        """Send ``data`` with ``fds`` attached to its first byte."""
        stream = self.stream
        if not isinstance(stream, trio.SocketStream) or stream.socket.family != stdsocket.AF_UNIX:
            raise UsageError("attach-fd needs a unix: control connection")
        ancillary = [(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array.array("i", fds))]
        async with self._lock:
            sent = await stream.socket.sendmsg([data], ancillary)
            if sent < len(data):
                await stream.send_all(data[sent:])

    # -- events --------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event, in order, until the receiver closes the connection."""
        while True:
            event = await self._next()
            if event is None:
                return
            yield event

    async def next_event(self) -> dict[str, Any] | None:
        """The next event, or None once the receiver closed the connection."""
        return await self._next()

    async def _next(self) -> dict[str, Any] | None:
        if self._backlog:
            return self._backlog.popleft()
        return await self._read()

    async def _read(self) -> dict[str, Any] | None:
        """The next event from the connection itself (the backlog aside)."""
        while True:
            try:
                obj = next(self._unpacker)
            except StopIteration:
                if self._eof:
                    return None
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    self._eof = True
                else:
                    self._unpacker.feed(data)
                continue
            except (ValueError, msgpack.UnpackException) as exc:
                raise PacketError(f"control event stream is not valid msgpack: {exc}") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                raise PacketError(f"control event {obj!r:.80} is not a map with a type")
            return obj

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def open_control_client(
    address: str, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[ControlClient]:
    """Connect to a receiver's control channel (TLS only for ``tcp:`` with ``tls``).

    Cancellation: the connection is closed on the way out.
    """
    addr = parse_address(address)
    stream: trio.abc.Stream = await connect(addr)
    if tls is not None and addr.kind == "tcp":
        ssl_stream = trio.SSLStream(stream, tls, server_hostname=addr.host)
        try:
            await ssl_stream.do_handshake()
        except BaseException:
            await stream.aclose()
            raise
        stream = ssl_stream
    client = ControlClient(stream)
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
