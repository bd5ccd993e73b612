"""One vfio-user client connection of the server: framing, fds, requests, replies.

One connection is one task that receives with ``recvmsg_into`` into a buffer of its own:
fds arrive with the read that took the first byte of the ``sendmsg`` they were sent with
(SCM_RIGHTS), and the kernel ends that read with that send's bytes, so they go to the last
message whose header starts in that read (not the first: a read may also hold requests
sent before them); a request's payload is handed to the handler as a view of
the buffer (a MIG_DATA_WRITE body reaches ``write_data`` without a copy). Requests are
handled and answered in the order they arrive, so a client may pipeline them. Replies
to the server's own DMA_READ / DMA_WRITE requests (sent by emulator tasks through
`Dma.read` / `Dma.write`) are matched by msg_id and handed to the waiting task
(`_server_requests`, the base class that sends them). Small register accesses take a
fast path: checked, handed to the region and answered with one ``send``. A read that
finds the socket empty waits briefly in one select() (`BriefWait`) before it parks in
trio's scheduler: a client with one request in flight answers within microseconds.

A MIG_DATA_WRITE to an emulator with a `WriteBuffer` skips the buffer: once its 24 bytes
of headers are in (and pass the handler's checks), the body bytes already received are
copied into the emulator's view and the rest is received straight into it, then
committed and answered like any write. Smaller requests around it are framed as usual.

Replies that are a bare header (a MIG_DATA_WRITE's, a REGION_WRITE's) are queued and
sent together, in order, in one ``sendmsg``: before the server waits for more bytes,
before any other message it sends, and once they answer `REPLY_BATCH_BYTES` of
requests. A client with one request in flight gets its reply at once (the server
waits for its next request); a pipelining client gets one wakeup per batch, not per
write. The socket's send buffer is `SEND_BUFFER`, so a 1 MiB MIG_DATA_READ reply goes
out in one call.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
from collections.abc import Sequence
from typing import Final

import trio

from vfiomig._logs import event
from vfiomig.transport import Throttle, close_fds, received_fds
from vfiomig.vfio_user._header import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER,
    HEADER_SIZE,
    SEND_BUFFER,
    Command,
    command_name,
)
from vfiomig.vfio_user._migration_bodies import DATA_HEAD_SIZE, MIG_SIZES, WRITE
from vfiomig.vfio_user.server._device import VfioUserDevice
from vfiomig.vfio_user.server._handlers import handle, mig_data_write_error, needs_quiesce
from vfiomig.vfio_user.server._region_handlers import region_access_fast
from vfiomig.vfio_user.server._regions import Buffer

# ANC_SIZE: room for the most fds one recvmsg can carry (SCM_MAX_FD): none are ever
# truncated into a leak, all are closed unless a handler keeps them.
from vfiomig.vfio_user.server._server_requests import (
    ANC_SIZE,
    BriefWait,
    ConnectionLost,
    ServerRequests,
    _Pending,
)
from vfiomig.vfio_user.server._session import (
    CloseConnection,
    EmulatorError,
    ResetReason,
    Session,
)

log = logging.getLogger("vfiomig.vfio_user")


_RECV_WINDOW: Final = 64 * 1024
#: Bare-header replies are sent at the latest once they answer this many request bytes
#: (a quarter of the vfiomig client's default window: it always has writes to send).
REPLY_BATCH_BYTES: Final = 2 * 1024 * 1024
#: ... or once this many are queued.
REPLY_BATCH_COUNT: Final = 64
REGION_WRITE: Final = Command.REGION_WRITE
_FAST_COMMANDS: Final = frozenset({int(Command.REGION_READ), int(Command.REGION_WRITE)})
_FAST_REPLY: Final = HEADER_SIZE + 16  # header and the access head it echoes
_JOIN_MAX: Final = 8 * 1024  # messages up to this size are copied into one send
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)  # an int: the IntFlag's & costs microseconds
#: How long the replies still queued for a client being dropped may take to send.
LAST_REPLIES_TIMEOUT: Final = 1.0


class Connection(ServerRequests):
    """One client: receives, frames and answers its requests in order (`run`)."""

    def __init__(self, sock: trio.socket.SocketType, device: VfioUserDevice) -> None:
        # A non-blocking stdlib twin of the socket: a syscall is tried first and trio is
        # only asked to wait when it would block (trio's socket methods add a scheduler
        # round per call, two thirds of a REGION_READ's cost).
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(sock.fileno()))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.calls = 0
        self.device = device
        self.session = Session()
        self.buf = bytearray(device.max_msg_size + 64 * 1024)
        self.view = memoryview(self.buf)
        self.start = 0  # the next message starts here
        self.end = 0  # bytes received up to here
        self.base = 0  # stream offset of buf[0]
        self.fd_chunks: list[tuple[int, int, list[int]]] = []  # (stream start, end, fds)
        self.skip = 0  # payload bytes of an oversized message still to drop
        self.wanted = HEADER_SIZE  # bytes the message at ``start`` needs in all
        self.send_lock = trio.StrictFIFOLock()
        self.replies = bytearray()  # bare-header replies not sent yet, in order
        self.replied = 0  # request bytes they answer
        self.next_id = 0
        self.pending: dict[int, _Pending] = {}  # the server's own requests, by msg_id
        #: The emulator's failures, at WARNING: a client repeating a failing request gets
        #: one line per interval, with the count of the others.
        self.emulator_failed = Throttle("vfio_user_emulator_failed", log)
        self.wait_first = False  # skip the next recvmsg's try (see `_recv`)
        self.idle = False  # parked in `_receive` between messages (see `_take_reply`)
        self.brief_wait = BriefWait()

    # ------------------------------------------------------------------ receiving

    async def _receive(self) -> bool:
        """Read more bytes (and fds); False at the end of the stream."""
        if self.start == self.end:
            self.base += self.start
            self.start = self.end = 0
        elif len(self.buf) - self.end < 4096:
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start : self.end]
            self.base += self.start
            self.start, self.end = 0, n
        # A window of what the current message still needs (at least 64 KiB): recvmsg_into
        # into a whole 1 MiB buffer costs ~140 us more per call than into 64 KiB.
        want = max(_RECV_WINDOW, self.wanted - (self.end - self.start))
        window = self.view[self.end : min(len(self.buf), self.end + want)]
        # Between messages, the next thing this task does with the stream is this read:
        # an emulator task may take its DMA reply off the socket first (`_take_reply`).
        self.idle = self.start == self.end and not self.skip
        try:
            nbytes, fds = await self._recv(window)
        finally:
            self.idle = False
        if fds:
            at = self.base + self.end
            self.fd_chunks.append((at, at + max(nbytes, 1), fds))
        self.end += nbytes
        return nbytes > 0

    async def _recv(self, window: memoryview) -> tuple[int, list[int]]:
        """One ``recvmsg_into`` into ``window``, waiting until the socket has something:
        (bytes, fds); 0 bytes at the end of the stream. Queued replies go out before the
        wait."""
        self.calls += 1
        if self.calls % 64 == 0:
            await trio.lowlevel.checkpoint()  # let the emulator's tasks run under load
        if self.wait_first:
            # The last bytes were a reply to one of our DMA requests: the client has
            # nothing more to say until the emulator's task sends the next one, so a
            # recvmsg now would only fail (a syscall and an exception per DMA).
            self.wait_first = False
            if self.replies:
                await self._send_buffers([], [])
            await trio.lowlevel.wait_readable(self.sock)
        while True:
            try:
                nbytes, ancdata, flags, _ = self.sock.recvmsg_into([window], ANC_SIZE)
                break
            except BlockingIOError:
                if self.replies:
                    await self._send_buffers([], [])
                if not self.brief_wait(self.sock):
                    await trio.lowlevel.wait_readable(self.sock)
        fds = received_fds(ancdata) if ancdata else []
        if flags & _MSG_CTRUNC:
            close_fds(fds)
            raise ConnectionLost("ancillary data was truncated")
        return nbytes, fds

    def _take_fds(self, at: int, size: int) -> list[int]:
        """The fds of the message at stream offset ``at`` of ``size`` bytes: those of the
        read it starts in, if it is the last message starting there (it runs to the read's
        end). fds of reads no message can claim any more are closed, with a warning."""
        if not self.fd_chunks:
            return []
        taken: list[int] = []
        keep: list[tuple[int, int, list[int]]] = []
        for chunk in self.fd_chunks:
            start, end, fds = chunk
            if start <= at < end and at + size >= end:
                taken += fds
            elif end <= at:
                log.warning(
                    "vfio-user: closed %d fd(s) that came with no message",
                    len(fds),
                    extra=event("vfio_user_fds_unclaimed", count=len(fds)),
                )
                close_fds(fds)
            else:
                keep.append(chunk)
        self.fd_chunks = keep
        return taken

    async def run(self) -> None:
        """Serve requests until the client's stream ends.

        Raises:
            ConnectionLost: the stream cannot be framed any more; the replies queued for
                the requests handled before that are sent first (within
                `LAST_REPLIES_TIMEOUT`), so every request handled is answered.

        Cancellation: a MIG_DATA_WRITE body being received into the emulator is torn
        (the device is reset); the replies were sent before the server waited.
        """
        try:
            await self._serve()
        except ConnectionLost:
            if self.replies:
                with trio.move_on_after(LAST_REPLIES_TIMEOUT):
                    try:
                        await self._send_buffers([], [])
                    except OSError:
                        pass  # the client is gone: nobody to tell
            raise

    async def _serve(self) -> None:
        while True:
            if self.skip:
                drop = min(self.skip, self.end - self.start)
                self.start += drop
                self.skip -= drop
                if not self.skip:
                    continue  # requests may be buffered behind the dropped bytes
            elif self.end - self.start >= HEADER_SIZE:
                msg_id, command, size, flags, error_no = HEADER.unpack_from(self.buf, self.start)
                if size < HEADER_SIZE:
                    raise ConnectionLost(
                        f"{command_name(command)} message size {size} is below {HEADER_SIZE}"
                    )
                if size > self.device.max_msg_size:
                    await self._oversized(msg_id, command, size, flags)
                    continue
                if (
                    command == WRITE
                    and not flags & FLAG_TYPE_MASK
                    and self.end - self.start >= DATA_HEAD_SIZE
                    and await self._write_into_emulator(msg_id, flags, size)
                ):
                    self.wanted = HEADER_SIZE
                    continue
                self.wanted = size
                if self.end - self.start >= size:
                    self.wanted = HEADER_SIZE
                    at = self.start
                    if (
                        command in _FAST_COMMANDS
                        and not flags
                        and not self.fd_chunks
                        and self.session.negotiated
                        and await self._fast_access(msg_id, command, size)
                    ):
                        continue
                    fds = self._take_fds(self.base + at, size)
                    payload = self.view[at + HEADER_SIZE : at + size]
                    self.start += size
                    try:
                        if flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY:
                            close_fds(fds)
                            self.deliver(msg_id, command, flags, error_no, payload)
                        else:
                            await self._request(msg_id, command, flags, size, payload, fds)
                    finally:
                        payload.release()
                    continue
            if not await self._receive():
                if self.end != self.start or self.skip:
                    raise ConnectionLost(
                        f"client closed inside a message ({self.end - self.start} bytes buffered)"
                    )
                if self.replies:  # a client that shut down its sending side still reads
                    await self._send_buffers([], [])
                return

    async def _fast_access(self, msg_id: int, command: int, size: int) -> bool:
        """A small register access (the message at ``start``) served without the general
        dispatch: checked, executed and answered with one ``send`` when the socket takes
        it; False, with nothing done, when it needs the full rules (`_request`)."""
        at = self.start
        try:
            data = region_access_fast(self.device, self.view, at, size, command == REGION_WRITE)
        except OSError as exc:
            self.start += size
            _log_failed(command_name(command), msg_id, exc, self.emulator_failed)
            await self._answer(msg_id, command, 0, size, _errno_of(exc))
            return True
        if data is None:
            return False
        self.start += size
        reply = (
            HEADER.pack(msg_id, command, _FAST_REPLY + len(data), FLAG_TYPE_REPLY, 0)
            + self.buf[at + HEADER_SIZE : at + _FAST_REPLY]
            + data
        )
        if not self.replies and not self.send_lock.locked():
            try:
                sent = self.sock.send(reply)
            except BlockingIOError:
                sent = 0
            if sent == len(reply):
                return True
            reply = reply[sent:]
        await self._send_buffers([reply], [])
        return True

    async def _oversized(self, msg_id: int, command: int, size: int, flags: int) -> None:
        log.debug(
            "vfio-user: %s msg_id %d of %d bytes is too large",
            command_name(command),
            msg_id,
            size,
            extra=event("vfio_user_request_refused", command=command_name(command), bytes=size),
        )
        await self._refuse(msg_id, command, size, flags, errno.EINVAL)

    async def _refuse(self, msg_id: int, command: int, size: int, flags: int, code: int) -> None:
        """Answer the request at ``start`` with ``code`` and drop its ``size`` bytes."""
        close_fds(self._take_fds(self.base + self.start, size))
        have = min(self.end - self.start, size)
        self.start += have
        self.skip = size - have
        if not flags & (FLAG_NO_REPLY | FLAG_TYPE_MASK):
            await self._send(msg_id, command, [], [], code)

    async def _write_into_emulator(self, msg_id: int, flags: int, size: int) -> bool:
        """A MIG_DATA_WRITE (header at ``start``) received straight into the emulator's
        `WriteBuffer` and committed; False if it does not go that way (no such buffer, or
        a request the handler refuses: it gets the buffered path and its error text).

        A body that does not arrive whole resets the device (`ResetReason.TORN_WRITE`)
        before the error propagates; cancellation likewise.
        """
        migration = self.device.migration
        if migration is None or migration.buffer is None or not self.session.negotiated:
            return False
        argsz, data_size = MIG_SIZES.unpack_from(self.buf, self.start + HEADER_SIZE)
        carried = size - DATA_HEAD_SIZE
        limit = self.session.client_max_data_xfer_size
        if (  # exactly the data it says, none empty, and nothing the handler refuses
            data_size != carried
            or data_size == 0
            or mig_data_write_error(argsz, data_size, carried, limit) is not None
        ):
            return False
        try:
            target = migration.write_target(data_size)
        except OSError as exc:
            _log_failed("MIG_DATA_WRITE", msg_id, exc, self.emulator_failed, "refused")
            await self._refuse(msg_id, WRITE, size, flags, _errno_of(exc))
            return True
        if target is None:
            return False
        close_fds(self._take_fds(self.base + self.start, size))
        body = self.start + DATA_HEAD_SIZE
        have = min(self.end - body, data_size)
        target[:have] = self.view[body : body + have]
        self.start = body + have
        got = have
        try:
            while got < data_size:
                nbytes, fds = await self._recv(target[got:])
                close_fds(fds)  # no message starts inside a body
                if not nbytes:
                    raise ConnectionLost(
                        f"client closed inside a MIG_DATA_WRITE body ({got} of {data_size} bytes)"
                    )
                got += nbytes
        except BaseException:
            self._torn(got, data_size)
            raise
        finally:
            target.release()
            self.base += got - have  # stream bytes that never were in ``buf``
        try:
            migration.commit(data_size)
        except OSError as exc:
            _log_failed("MIG_DATA_WRITE", msg_id, exc, self.emulator_failed)
            await self._answer(msg_id, WRITE, flags, size, _errno_of(exc))
        else:
            await self._answer(msg_id, WRITE, flags, size, None)
        return True

    def _torn(self, got: int, size: int) -> None:
        log.warning(
            "vfio-user: MIG_DATA_WRITE body cut short (%d of %d bytes): resetting the device",
            got,
            size,
            extra=event("vfio_user_torn_write", received=got, size=size),
        )
        try:
            self.device.do_reset(ResetReason.TORN_WRITE)
        except OSError as exc:
            log.warning(
                "vfio-user: reset after a torn write failed: %s",
                exc,
                extra=event("vfio_user_reset_failed", reason=str(exc)),
            )

    async def _request(
        self, msg_id: int, command: int, flags: int, size: int, payload: memoryview, fds: list[int]
    ) -> None:
        close = False
        parts: Sequence[Buffer] = []
        out_fds: list[int] = []
        error: int | None = None
        try:
            if needs_quiesce(self.device, self.session, command, payload):
                await self.device.quiesce(command_name(command))
            reply = handle(self.device, self.session, command, payload, fds)
        except OSError as exc:
            _log_failed(command_name(command), msg_id, exc, self.emulator_failed)
            error = _errno_of(exc)
        except CloseConnection as exc:
            log.warning(
                "vfio-user: dropping the client: %s", exc, extra=event("vfio_user_client_dropped")
            )
            error, close = exc.errno, True
        else:
            parts, out_fds = reply.parts, reply.fds
        finally:
            close_fds(fds)
        await self._answer(msg_id, command, flags, size, error, parts, out_fds)
        if close:
            raise ConnectionLost("negotiation failed")

    async def _answer(
        self,
        msg_id: int,
        command: int,
        flags: int,
        size: int,
        error: int | None,
        parts: Sequence[Buffer] = (),
        fds: Sequence[int] = (),
    ) -> None:
        """Reply to the request of ``size`` bytes (none if it asked for none); a bare
        header is queued (see the module docstring)."""
        if flags & FLAG_NO_REPLY:
            return
        if error is None and not parts and not fds:
            self.replies += HEADER.pack(msg_id, command, HEADER_SIZE, FLAG_TYPE_REPLY, 0)
            self.replied += size
            if self.replied >= REPLY_BATCH_BYTES or len(self.replies) >= (
                REPLY_BATCH_COUNT * HEADER_SIZE
            ):
                await self._send_buffers([], [])
        else:
            await self._send(msg_id, command, parts, fds, error, reply=True)

    # ------------------------------------------------------------------ sending

    async def _send(
        self,
        msg_id: int,
        command: int,
        parts: Sequence[Buffer],
        fds: Sequence[int],
        error: int | None,
        *,
        reply: bool = True,
    ) -> None:
        size = HEADER_SIZE
        for part in parts:
            size += part.nbytes if isinstance(part, memoryview) else len(part)
        flags = (FLAG_TYPE_REPLY if reply else 0) | (FLAG_ERROR if error is not None else 0)
        head = HEADER.pack(msg_id, command, size, flags, error or 0)
        if size <= _JOIN_MAX and not fds and not self.replies and not self.send_lock.locked():
            # A small message (a DMA request, most replies) in one send of one copy: the
            # lock and the scatter list cost more than the copy.
            message = b"".join([head, *parts])
            try:
                sent = self.sock.send(message)
            except BlockingIOError:
                sent = 0
            if sent < size:
                await self._send_buffers([memoryview(message)[sent:]], [])
            return
        await self._send_buffers([head, *parts], fds)

    async def _send_buffers(self, buffers: list[Buffer], fds: Sequence[int]) -> None:
        """Send the queued bare-header replies, then ``buffers`` (fds with their first
        byte), in as many ``sendmsg`` calls as the socket needs (no copy)."""
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:  # the lock is only ever held across a wait for room in the socket
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            if self.replies:  # queued before this message: they go first
                buffers.insert(0, bytes(self.replies))
                self.replies.clear()
                self.replied = 0
            while buffers:
                try:
                    sent = self.sock.sendmsg(buffers, anc)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                anc = []
                while sent:
                    first = memoryview(buffers[0]).cast("B")
                    if sent < first.nbytes:
                        buffers[0] = first[sent:]
                        break
                    sent -= first.nbytes
                    del buffers[0]
                else:
                    while buffers and not len(buffers[0]):
                        del buffers[0]
        finally:
            self.send_lock.release()

    def fail_pending(self) -> None:
        self.fail_requests()
        for _, _, fds in self.fd_chunks:
            close_fds(fds)
        self.fd_chunks = []


def _errno_of(exc: OSError) -> int:
    return exc.errno if exc.errno and exc.errno > 0 else errno.EIO


def _log_failed(
    command: str, msg_id: int, exc: BaseException, warn: Throttle, what: str = "failed"
) -> None:
    """The line of a request answered with an errno: WARNING when the emulator's callback
    failed (its text is the operator's only view of why: the reply carries an errno),
    DEBUG for the requests the library refused itself."""
    if isinstance(exc, EmulatorError):
        warn("vfio-user: %s msg_id %d %s: %s", command, msg_id, what, exc.strerror)
        return
    log.debug(
        "vfio-user: %s msg_id %d %s: %s",
        command,
        msg_id,
        what,
        exc,
        extra=event("vfio_user_request_failed", command=command, reason=str(exc)),
    )
