"""The socket of one vfio-user client: requests out (with fds), replies and the server's own
requests in (with fds), one receiver at a time.

Any number of tasks may have a request outstanding. Whoever waits for a reply while
nobody is receiving becomes the receiver: it reads the socket, hands every reply to the
task it belongs to, answers the server's DMA_READ / DMA_WRITE through ``on_request``, and
wakes the others when a round is done; `serve` keeps a receiver running while no request
is outstanding, so the server's DMA requests are answered at any time (a VMM's job).

fds that come with the bytes (SCM_RIGHTS) go to the first message that takes fds (a
DEVICE_GET_REGION_INFO or GET_REGION_IO_FDS reply) whose header starts in the read they came with; fds that
no message took are closed. Every wait is bounded by ``timeout``; after a broken socket,
bytes that break the protocol or a cancel inside a message the channel is ``broken``
and every later call raises.
"""

from __future__ import annotations

import array
import errno as _errno
import socket
from collections.abc import Callable, Sequence
from typing import Final

import trio

from vfiomig._core._errors import SinkError
from vfiomig.transport import close_fds, received_fds
from vfiomig.vfio_user._header import Command, ProtocolError
from vfiomig.vfio_user._protocol import Buffer, ClientConnection, Message, Reply, encode_message

#: Room for the most fds one recvmsg can carry (SCM_MAX_FD).
_ANC_SIZE: Final = socket.CMSG_SPACE(253 * 4)
_RECEIVE_SIZE: Final = 256 * 1024
#: Replies that carry fds.
FD_REPLIES: Final = frozenset({Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_REGION_IO_FDS})

#: Answers one server request: the reply payload, or raises ``OSError(errno)``.
RequestHandler = Callable[[Message], Buffer]


class Channel:
    """See the module docstring. ``where`` prefixes every error text."""

    def __init__(
        self, sock: socket.socket, where: str, *, timeout: float, max_msg_size: int
    ) -> None:
        self.sock = sock
        self.where = where
        self.timeout = timeout
        self.conn = ClientConnection(max_msg_size=max_msg_size)
        self.on_request: RequestHandler | None = None
        self.requests_served = 0
        self.serving = False
        self.broken = False
        self._failure: BaseException | None = None
        self._eof = False
        self._closed = False
        self._send_lock = trio.StrictFIFOLock()
        self._receiving = False
        self._round = trio.Event()
        self._replies: dict[int, tuple[Reply, list[int]]] = {}
        self._abandoned: set[int] = set()  # msg_ids whose waiter was cancelled
        # One receive buffer for the channel's life (recvmsg would allocate its size anew
        # for every call: a fresh mapping at this size).
        self._rbuf = memoryview(bytearray(_RECEIVE_SIZE))
        self._fed = 0  # stream bytes handed to ``conn``
        self._fd_chunks: list[tuple[int, int, list[int]]] = []  # (stream start, end, fds)

    # ------------------------------------------------------------------ state

    @property
    def idle(self) -> bool:
        """Nothing outstanding, nothing buffered, nobody receiving: the socket may be
        driven directly (the MIG_DATA pipelines)."""
        return (
            not self.serving
            and not self._receiving
            and not self.conn.pending
            and not self.conn.buffered
            and not self._replies
        )

    def check(self) -> None:
        if self.broken:
            cause = f" ({self._failure})" if self._failure is not None else ""
            raise SinkError(
                f"{self.where}: connection is unusable after an earlier error{cause}",
                errno=_errno.EPIPE,
            )

    def fail(self, exc: BaseException) -> None:
        """Mark the channel broken by ``exc`` (kept for the text of later errors)."""
        if not self.broken:
            self.broken = True
            self._failure = exc
        self._wake()

    def _io_error(self, what: str, exc: BaseException) -> SinkError:
        errno = getattr(exc, "errno", None) or _errno.EPIPE
        err = SinkError(f"{self.where}: {what} failed ({exc or type(exc).__name__})", errno=errno)
        self.fail(err)
        return err

    # ------------------------------------------------------------------ sending

    async def send(
        self, command: Command, payload: Buffer | Sequence[Buffer], fds: Sequence[int] = ()
    ) -> int:
        """Send one request (``fds`` travel with its first byte); its msg_id."""
        self.check()
        msg_id, data = self.conn.send(command, payload)
        try:
            await self._send_bytes(data, fds, command.name)
        except BaseException:
            if not self.broken:  # cancelled before its first byte: it was never sent
                self.conn.unsent(msg_id)
            raise
        return msg_id

    async def _send_bytes(self, data: bytes, fds: Sequence[int], what: str) -> None:
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        view = memoryview(data)
        try:
            with trio.fail_after(self.timeout):
                async with self._send_lock:
                    while view:
                        try:
                            sent = self.sock.sendmsg([view], anc)
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(self.sock)
                            continue
                        anc = []
                        view = view[sent:]
        except trio.TooSlowError as exc:
            err = SinkError(
                f"{self.where}: sending {what} took longer than {self.timeout} s",
                errno=_errno.ETIMEDOUT,
            )
            self.fail(err)
            raise err from exc
        except OSError as exc:
            raise self._io_error(f"sending {what}", exc) from exc
        except BaseException as exc:
            if len(view) not in (0, len(data)):
                self.fail(exc)  # cancelled mid-message: the stream is out of step
            raise

    # ------------------------------------------------------------------ receiving

    async def reply(self, msg_id: int, what: str) -> tuple[Reply, list[int]]:
        """Wait for the reply to ``msg_id`` (and the fds that came with it), receiving
        while nobody else does. Raises `SinkError` after `timeout` or when the channel
        breaks, `ProtocolError` for bytes that break the protocol."""
        try:
            with trio.fail_after(self.timeout):
                while msg_id not in self._replies:
                    self.check()
                    if self._receiving:
                        await self._round.wait()
                    else:
                        await self._receive_round()
        except trio.TooSlowError as exc:
            err = SinkError(
                f"{self.where}: no reply within {self.timeout} s to {what} "
                f"({self.conn.pending} outstanding)",
                errno=_errno.ETIMEDOUT,
            )
            self.fail(err)
            raise err from exc
        except BaseException:
            # Cancelled: nobody takes this reply; it is dropped when it comes (its msg_id
            # may be used again once it has).
            if msg_id in self._replies:
                close_fds(self._replies.pop(msg_id)[1])
            else:
                self._abandoned.add(msg_id)
            raise
        return self._replies.pop(msg_id)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive for as long as the channel lives, answering the server's requests
        while no task waits for a reply; returns when the server closes the connection.

        Cancellation: safe between messages (the usual place it waits).
        """
        self.serving = True
        task_status.started()
        try:
            while not self._eof and not self.broken:
                if self._receiving:
                    await self._round.wait()
                else:
                    await self._receive_round()
        except trio.ClosedResourceError:
            if not self._closed:
                raise
            # The owner closed the client while we waited: the end of serving.
        finally:
            self.serving = False

    def _wake(self) -> None:
        self._round.set()
        self._round = trio.Event()

    async def _receive_round(self) -> None:
        """Receive once (waiting for bytes), dispatch what came, wake the waiters."""
        self._receiving = True
        try:
            await self._receive_once()
        finally:
            self._receiving = False
            self._wake()

    async def _receive_once(self) -> None:
        try:
            while True:
                try:
                    nbytes, ancdata, flags, _ = self.sock.recvmsg_into([self._rbuf], _ANC_SIZE)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.sock)
        except OSError as exc:
            raise self._io_error("receiving", exc) from exc
        data = self._rbuf[:nbytes]  # copied into the connection's buffer below
        fds = received_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            err = ProtocolError(f"{self.where}: ancillary data was truncated")
            self.fail(err)
            raise err
        if fds:
            self._fd_chunks.append((self._fed, self._fed + max(len(data), 1), fds))
        self._fed += len(data)
        if not data:
            self._eof = True
            if self.conn.pending:  # what came before was dispatched already
                gone = SinkError(
                    f"{self.where}: server closed the connection with "
                    f"{self.conn.pending} replies outstanding",
                    errno=_errno.ECONNRESET,
                )
                self.fail(gone)
                raise gone
        try:
            self.conn.receive_data(data)
            await self._dispatch()
        except ProtocolError as exc:
            err = ProtocolError(f"{self.where}: {exc}")
            self.fail(err)
            raise err from None

    async def _dispatch(self) -> None:
        while True:
            start = self._fed - self.conn.buffered
            event = self.conn.next_event()
            if event is None:
                break
            if isinstance(event, Reply):
                end = self._fed - self.conn.buffered
                fds = self._take_fds(start, end) if event.command in FD_REPLIES else []
                if event.msg_id in self._abandoned:
                    self._abandoned.discard(event.msg_id)
                    close_fds(fds)
                else:
                    self._replies[event.msg_id] = (event, fds)
            else:
                await self._answer(event)
        next_start = self._fed - self.conn.buffered
        keep = []
        for chunk in self._fd_chunks:
            if chunk[1] <= next_start:
                close_fds(chunk[2])  # no message that takes fds started in that read
            else:
                keep.append(chunk)
        self._fd_chunks = keep

    def _take_fds(self, start: int, end: int) -> list[int]:
        """The fds of the reply at stream bytes ``[start, end)``, if it carried any.

        The kernel ends a receive at the end of the send that carried fds (a unix stream
        socket never reads past an skb with SCM_RIGHTS), and a server sends a reply and
        its fds in one ``sendmsg``: so a read's fds are the reply that holds the read's
        last byte. A reply that merely starts in the read (replies sent earlier, read
        together with it) takes none.
        """
        for i, (_, chunk_end, fds) in enumerate(self._fd_chunks):
            if start < chunk_end <= end:
                del self._fd_chunks[i]
                return fds
        return []

    async def _answer(self, msg: Message) -> None:
        """Answer one DMA_READ / DMA_WRITE from the server (an errno if we cannot)."""
        self.requests_served += 1
        payload: Buffer = b""
        error: int | None = None
        if self.on_request is None:
            error = _errno.EFAULT  # no guest memory: nothing to read or write
        else:
            try:
                payload = self.on_request(msg)
            except OSError as exc:
                error = exc.errno if exc.errno and 0 < exc.errno < 4096 else _errno.EINVAL
        if msg.header.no_reply:
            return
        data = encode_message(msg.msg_id, msg.command, payload, reply=True, error_no=error)
        await self._send_bytes(data, (), f"the {Command(msg.command).name} reply")

    def close(self) -> None:
        """Close the fds still held (the socket is the owner's)."""
        for _, _, fds in self._fd_chunks:
            close_fds(fds)
        self._fd_chunks = []
        for _, fds in self._replies.values():
            close_fds(fds)
        self._replies.clear()
        self._closed = True
        self.broken = True
        self._wake()
