"""The trio vfio-user server: the listening socket and one client at a time.

``serve_vfio_user(path, device)`` listens on a UNIX socket and serves one client at a
time (as libvfio-user does). A client that connects while another is served is not left
waiting in the backlog: its first message gets the error EBUSY, so that it can say the
server is busy (`REFUSAL_TIMEOUT`, at most `MAX_REFUSALS` such answers at once: past
that a newcomer is closed at once), with a log line. When a client goes away its DMA
mappings and eventfds are dropped (and the device reset, if it asked for that) and the
next client is served. The device outlives every connection. What one connection does
(framing, fds, batched replies, MIG_DATA_WRITE bodies) is `_connection`.

A socket file left at ``path`` by a server that crashed is replaced; one where a server
still listens, or a file that is not a socket, is not (`claim_path`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import stat

import trio

from vfiomig._logs import event
from vfiomig.transport import ACCEPT_CAPACITY_ERRNOS, Throttle, unix_socket_listening
from vfiomig.vfio_user._header import (
    FLAG_ERROR,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER,
    HEADER_SIZE,
)
from vfiomig.vfio_user.server._connection import Connection
from vfiomig.vfio_user.server._device import Emulator, VfioUserDevice
from vfiomig.vfio_user.server._server_requests import ConnectionLost

log = logging.getLogger("vfiomig.vfio_user")

_staging_ids = itertools.count()

#: How long a new client waits for the previous one's task to finish when that client has
#: already hung up (it is refused after that).
HANDOVER_TIMEOUT = 2.0
#: How long a refused client has to send its first message (and get EBUSY back).
REFUSAL_TIMEOUT = 0.5
#: Refused clients answered at once; more are closed without an answer.
MAX_REFUSALS = 4
#: The largest first message a refused client may send (a VERSION is far smaller).
_REFUSAL_MAX_BYTES = 4096


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
    ``once`` until the first client has gone (as libvfio-user's samples do; a connection
    that closes without sending a byte is a probe, not that client).

    A socket file at ``path`` that nothing listens on is replaced (`claim_path`).

    Raises:
        OSError: EADDRINUSE when a server listens at ``path``; FileExistsError when
            ``path`` is a file that is not a socket.

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
        claim_path(staging, path)
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
                refusing = trio.Semaphore(MAX_REFUSALS)

                async def serve(client: trio.socket.SocketType) -> None:
                    nonlocal current
                    spoke = True
                    try:
                        with client:
                            spoke = await _serve_connection(client, device)
                    finally:
                        current = None
                        done.set()
                        # A connection that closed without a byte is a probe (another
                        # server checking whether this path is alive), not the client.
                        if once and spoke:
                            nursery.cancel_scope.cancel()

                async def refuse(client: trio.socket.SocketType) -> None:
                    try:
                        with client, trio.move_on_after(REFUSAL_TIMEOUT):
                            await _answer_busy(client)
                    finally:
                        refusing.release()

                while True:
                    client = await _accept(sock, path)
                    if current is not None and _hung_up(current):
                        # The client being served has gone but its task has not seen the
                        # EOF yet: a client that reconnects at once is the next one.
                        with trio.move_on_after(HANDOVER_TIMEOUT):
                            await done.wait()
                    if current is not None:
                        refusals("vfio-user %s: refusing a client, one is being served", path)
                        try:
                            refusing.acquire_nowait()
                        except trio.WouldBlock:
                            client.close()
                        else:
                            nursery.start_soon(refuse, client)
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
    await _serve_connection(sock, device)


async def _serve_connection(sock: trio.socket.SocketType, device: VfioUserDevice) -> bool:
    """`serve_vfio_user_connection`; True if the client sent anything at all."""
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
        if device.dma.regions and device.quiesce_callback is not None:
            # The mappings go: the emulator must be quiet first, as for a DMA_UNMAP
            # (bounded by its quiesce_timeout, even while the server is cancelled).
            with trio.CancelScope(shield=True):
                try:
                    await device.quiesce("the client's disconnect")
                except OSError:
                    pass  # logged; the client is gone either way
        for fd in device.disconnected():
            os.close(fd)
    return conn.base + conn.end > 0


async def _answer_busy(client: trio.socket.SocketType) -> None:
    """Read a refused client's first message and answer it with EBUSY (no reply if it
    closes or sends something that is not a small request)."""
    data = b""
    while len(data) < HEADER_SIZE or len(data) < HEADER.unpack_from(data)[2]:
        chunk = await client.recv(_REFUSAL_MAX_BYTES)
        if not chunk:
            return
        data += chunk
        if len(data) >= HEADER_SIZE:
            size, flags = HEADER.unpack_from(data)[2:4]
            if not HEADER_SIZE <= size <= _REFUSAL_MAX_BYTES or flags & FLAG_TYPE_MASK:
                return
    msg_id, command = HEADER.unpack_from(data)[:2]
    await client.send(
        HEADER.pack(msg_id, command, HEADER_SIZE, FLAG_TYPE_REPLY | FLAG_ERROR, errno.EBUSY)
    )


def claim_path(staging: str, path: str) -> None:
    """Give the listening socket bound at ``staging`` the name ``path``.

    A socket file already at ``path`` where nothing listens (left by a server that
    crashed) is replaced; EADDRINUSE where a server listens (bound there, as libvfio-user
    binds, or linked there, as this library does: a connection is tried, which this
    library's servers do not count as a client), EEXIST for a file that is not a socket.
    """
    for _ in range(3):  # the path may come and go while we look
        try:
            os.link(staging, path)
        except FileExistsError:
            pass
        else:
            os.unlink(staging)
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST, f"vfio-user {path}: the path exists and is not a socket"
            )
        if _listening(path):
            raise OSError(errno.EADDRINUSE, f"vfio-user {path}: a server is listening there")
        log.warning(
            "vfio-user %s: replacing a socket nothing listens on (a server that crashed?)",
            path,
            extra=event("vfio_user_stale_socket", path=path),
        )
        os.rename(staging, path)  # atomic: the path is never missing for a client
        return
    raise OSError(errno.EADDRINUSE, f"vfio-user {path}: the path keeps changing")


def _listening(path: str) -> bool:
    """Something accepts connections at ``path``."""
    if unix_socket_listening(path):
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:
            return True  # its backlog is full: alive
        return True
