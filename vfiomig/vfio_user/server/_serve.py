"""The trio vfio-user server: the listening socket and one client at a time.

``serve_vfio_user(path, device)`` listens on a UNIX socket and serves one client at a
time; a client that connects while another is served is accepted and closed at once
(with a log line), not left waiting in the backlog. When a client goes away its DMA
mappings and eventfds are dropped (and the device reset, if it asked for that) and the
next client is served. The device outlives every connection. What one connection does
(framing, fds, batched replies, MIG_DATA_WRITE bodies) is `_connection`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket

import trio

from vfiomig._logs import event
from vfiomig.transport import ACCEPT_CAPACITY_ERRNOS, Throttle
from vfiomig.vfio_user.server._connection import Connection, ConnectionLost
from vfiomig.vfio_user.server._device import Emulator, VfioUserDevice

log = logging.getLogger("vfiomig.vfio_user")

_staging_ids = itertools.count()

#: How long a new client waits for the previous one's task to finish when that client has
#: already hung up (it is refused after that).
HANDOVER_TIMEOUT = 2.0


async def _accept(sock: trio.socket.SocketType, path: str) -> trio.socket.SocketType:
    """The next client. Running out of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
    is waited out, as trio's ``serve_listeners`` does: it never ends the server."""
    while True:
        try:
            client, _ = await sock.accept()
            return client
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            log.warning(
                "vfio-user %s: accept failed: %s; retrying in 0.1 s",
                path,
                exc,
                extra=event("vfio_user_accept_failed", errno=exc.errno),
            )
            await trio.sleep(0.1)


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """The peer of ``sock`` closed its side (it may still have bytes in flight to us)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))


async def serve_vfio_user(
    path: str | os.PathLike[str],
    device: VfioUserDevice | Emulator,
    *,
    once: bool = False,
    task_status: trio.TaskStatus[VfioUserDevice] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``device`` on a new UNIX socket at ``path``: until cancelled, or with
    ``once`` until the first client has gone (as libvfio-user's samples do).

    ``device`` may be a bare `Emulator`; it is then wrapped in a `VfioUserDevice`.
    ``task_status.started`` reports the `VfioUserDevice` once the socket listens. The
    socket file is removed on exit.

    Cancellation: the usual way to stop; a connection being served is closed (its DMA
    mappings and eventfds are released as on a disconnect).
    """
    if not isinstance(device, VfioUserDevice):
        device = VfioUserDevice(device)
    path = os.fspath(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket appears at ``path`` only once it listens (bound under a temporary name,
    # then renamed): a client that connects as soon as the file exists, as libvfio-user's
    # samples/client does, is never refused.
    staging = os.path.join(os.path.dirname(path), f".vu{os.getpid()}-{next(_staging_ids)}")
    try:
        await sock.bind(staging)
        sock.listen(8)
        os.link(staging, path)  # EEXIST if the path is taken, as bind would say
        os.unlink(staging)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    try:
        with sock:
            task_status.started(device)
            async with trio.open_nursery() as nursery:
                current: trio.socket.SocketType | None = None
                done = trio.Event()
                refusals = Throttle("vfio_user_client_refused", log)

                async def serve(client: trio.socket.SocketType) -> None:
                    nonlocal current
                    try:
                        with client:
                            await serve_vfio_user_connection(client, device)
                    finally:
                        current = None
                        done.set()
                        if once:
                            nursery.cancel_scope.cancel()

                while True:
                    client = await _accept(sock, path)
                    if current is not None and _hung_up(current):
                        # The client being served has gone but its task has not seen the
                        # EOF yet: a client that reconnects at once is the next one.
                        with trio.move_on_after(HANDOVER_TIMEOUT):
                            await done.wait()
                    if current is not None:
                        refusals("vfio-user %s: refusing a client, one is being served", path)
                        client.close()
                        continue
                    current = client
                    done = trio.Event()
                    nursery.start_soon(serve, client)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def serve_vfio_user_connection(sock: trio.socket.SocketType, device: VfioUserDevice) -> None:
    """Serve one client on a connected UNIX stream socket until it goes away.

    Returns normally when the client disconnects or breaks the framing (logged; the
    device keeps its state, minus the client's DMA mappings and eventfds). Emulator
    exceptions other than ``OSError`` propagate. Cancellation: closes nothing but what
    this connection owns.
    """
    conn = Connection(sock, device)
    device.dma.messenger = conn.request
    try:
        with conn.sock:
            await conn.run()
    except ConnectionLost as exc:
        log.warning(
            "vfio-user: dropping the client: %s", exc, extra=event("vfio_user_client_dropped")
        )
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug(
            "vfio-user: client went away: %r",
            exc,
            extra=event("vfio_user_client_gone", reason=str(exc)),
        )
    finally:
        conn.fail_pending()
        for fd in device.disconnected():
            os.close(fd)
