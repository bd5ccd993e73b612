"""A trio vfio-user server for Python device emulators.

``serve_vfio_user(path, device)`` listens on a UNIX socket and serves one client at a time,
as libvfio-user does; further clients wait in the listen backlog. The device (its
migration state and its emulator) outlives every connection, so a client can disconnect
and another one pick up where it left, as the spec asks of servers.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import NoReturn

import trio

from vfiomig.vfio_user._device import Emulator, Session, VfioUserDevice
from vfiomig.vfio_user._messages import ProtocolError, command_name
from vfiomig.vfio_user._protocol import ServerConnection

log = logging.getLogger("vfiomig.vfio_user")

_RECEIVE_SIZE = 256 * 1024


async def serve_vfio_user(
    path: str | os.PathLike[str],
    device: VfioUserDevice | Emulator,
    *,
    backlog: int = 8,
    task_status: trio.TaskStatus[VfioUserDevice] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``device`` on a new UNIX socket at ``path`` until cancelled.

    ``device`` may be a bare emulator; it is then wrapped in a `VfioUserDevice` with the
    default limits. ``task_status.started`` reports the `VfioUserDevice` once the socket
    listens. The socket file is removed on exit.

    Cancellation: the usual way to stop the server; a connection being served is closed.
    """
    if not isinstance(device, VfioUserDevice):
        device = VfioUserDevice(device)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = os.fspath(path)
    try:
        await sock.bind(path)
        sock.listen(backlog)
        listener = trio.SocketListener(sock)
    except BaseException:
        sock.close()
        raise
    try:
        async with listener:
            task_status.started(device)
            while True:
                stream = await listener.accept()
                async with stream:
                    await serve_vfio_user_connection(stream, device)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def serve_vfio_user_connection(stream: trio.abc.Stream, device: VfioUserDevice) -> None:
    """Serve one client on ``stream`` until it disconnects or breaks the protocol.

    Returns normally in both cases (a misbehaving client is logged and dropped; the
    device keeps its state). Errors in the emulator other than ``OSError`` propagate.
    """
    conn = ServerConnection(max_msg_size=device.max_msg_size)
    session = Session()
    try:
        while True:
            msg = conn.next_request()
            if msg is None:
                if conn.closed:
                    return
                conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
                continue
            outcome = device.handle(session, msg)
            if not msg.header.no_reply:
                if outcome.errno is not None:
                    await stream.send_all(conn.error(msg, outcome.errno))
                else:
                    assert outcome.body is not None
                    await stream.send_all(conn.reply(msg, outcome.body.pack()))
            if outcome.errno is not None:
                log.debug(
                    "vfio-user: %s msg_id %d failed with errno %d",
                    command_name(msg.command),
                    msg.msg_id,
                    outcome.errno,
                )
            if outcome.close:
                return
    except ProtocolError as exc:
        log.warning("vfio-user: dropping the client: %s", exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("vfio-user: client went away: %r", exc)
