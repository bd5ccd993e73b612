"""One control connection's parts: its outgoing queue, how it reads bytes and fds, and the
messages every connection shares (`vfiomig.control._server` serves them)."""

from __future__ import annotations

import logging
import socket as stdsocket
from dataclasses import dataclass, field
from typing import Any

import trio

from vfiomig._logs import event
from vfiomig.control import _proto as proto
from vfiomig.receive import Device
from vfiomig.transport import Pending, received_fds

log = logging.getLogger("vfiomig")

RECEIVE_SIZE = 256 * 1024
#: fds accepted with one receive; more are closed by the kernel (MSG_CTRUNC).
MAX_FDS = 8
#: Progress events queued for one connection beyond which new ones are dropped.
PROGRESS_BACKLOG = 8


@dataclass(slots=True)
class Out:
    data: bytes
    delivered: trio.Event | None = None  # set once written to a socket (config events)
    droppable: bool = False


@dataclass(slots=True, eq=False)
class Connection:
    stream: trio.abc.Stream
    label: str
    send: trio.MemorySendChannel[Out]
    receive: trio.MemoryReceiveChannel[Out]
    ticket: Pending  # done once the connection sent a valid message (or was evicted)
    reader: trio.CancelScope = field(default_factory=trio.CancelScope)
    admitted: bool = False

    def queue(self, out: Out) -> None:
        if out.droppable and self.receive.statistics().current_buffer_used >= PROGRESS_BACKLOG:
            return
        try:
            self.send.send_nowait(out)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the connection is ending


def admits(msg: proto.Message) -> bool:
    """Whether ``msg`` makes its connection a client (it was pending until then): any
    known command, but a ``hello`` only in our version."""
    if isinstance(msg, proto.Hello):
        return msg.version == proto.VERSION
    return not isinstance(msg, proto.Unknown)


def error_event(message: str, device: Device | None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "error", "message": message}
    if device is not None:
        msg["device"] = device.idstr
        msg["instance"] = device.instance
    return msg


async def recv_with_fds(sock: trio.socket.SocketType, fds: list[int], label: str) -> bytes:
    """One recvmsg; the fds that came with the bytes are appended to ``fds`` (ours now)."""
    data, ancdata, flags, _ = await sock.recvmsg(
        RECEIVE_SIZE, stdsocket.CMSG_SPACE(MAX_FDS * 4), stdsocket.MSG_CMSG_CLOEXEC
    )
    fds.extend(received_fds(ancdata))
    if flags & stdsocket.MSG_CTRUNC:
        log.warning(
            "control: %s sent more than %d fds at once: the rest were closed",
            label,
            MAX_FDS,
            extra=event("control_fds_truncated", peer=label, limit=MAX_FDS),
        )
    return data
