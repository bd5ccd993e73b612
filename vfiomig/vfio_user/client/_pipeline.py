"""Pipelined MIG_DATA_WRITE (and the base of the MIG_DATA_READ pipeline, in
`_read_pipeline`) on a client's non-blocking UNIX socket.

The vfio-user spec lets a client pipeline commands; the server processes them in the
order received. Both pipelines keep up to ``window`` requests in flight, make their
syscalls directly on the socket (no trio wakeup per message; a checkpoint every
`CHECKPOINT_BYTES`), and match replies to requests by ``msg_id``.

Writes: each MIG_DATA_WRITE goes out in one ``sendmsg`` (header, then the caller's
buffers, never copied). A write whose reply is an ERROR fails the stream: nothing is
sent after the reply is seen, the writes already in flight behind it are collected and
counted, and `WriteFailed` names the failed write (stream offset, size, the idx its
data came from) and errno. While a large write is blocked on a full socket the replies
are still read, so a refusal is seen at once, not after the send timeout.

Reads: MIG_DATA_READs of ``size`` bytes each; the data comes back in request order and
ends at the first reply carrying 0 bytes; data after that end is a protocol error. An
ERROR reply fails the read: nothing more is asked, the replies still owed are dropped
(`drain`), and the connection stays in step for the client's next command (a source's
abort: SET RUNNING).

Every wait is bounded by ``timeout``; a timeout or a broken socket raises `SinkError`,
bytes that break the protocol raise `ProtocolError`. Cancellation: a cancel between
messages leaves the connection in step (replies still owed are collected by `flush`); a
cancel inside a partly sent message marks the pipeline ``broken``.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar

import trio

from vfiomig._core._errors import SinkError
from vfiomig.vfio_user._header import (
    FLAG_ERROR,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER,
    HEADER_SIZE,
    ProtocolError,
    command_name,
)
from vfiomig.vfio_user._migration_bodies import (
    DATA_HEAD,
    DATA_HEAD_SIZE,
    MIG_DATA_HEADER_SIZE,
    WRITE,
)
from vfiomig.vfio_user._protocol import Buffer

#: Bytes moved between two trio checkpoints, so other tasks keep running.
CHECKPOINT_BYTES: Final = 1024 * 1024
#: After a refused write, how long the replies of the writes behind it are awaited (a
#: server may stop reading after an error); those still missing are counted unanswered.
FAILURE_GRACE: Final = 2.0
_T = TypeVar("_T")
#: The idx range ``(first, end)`` a write's data came from, if known.
Tag: TypeAlias = "tuple[int, int] | None"


def describe_errno(errno: int) -> str:
    """``errno 5 (Input/output error)``; ``no errno`` for 0."""
    if errno == 0:
        return "no errno"
    try:
        return f"errno {errno} ({os.strerror(errno)})"
    except ValueError:
        return f"errno {errno}"


@dataclass(slots=True)
class _Write:
    seq: int  # 0 for the pipeline's first write
    offset: int
    size: int
    tag: Tag
    errno: int = 0  # set when its ERROR reply came


class VfioUserCommandError(SinkError):
    """The server answered a command with an ERROR reply.

    Attributes:
        command: the command number; ``errno``: the server's errno (None if it sent 0).
    """

    def __init__(
        self, message: str, *, command: int, errno: int | None, idx: int | None = None
    ) -> None:
        super().__init__(message, errno=errno, idx=idx)
        self.command = command


class WriteFailed(VfioUserCommandError):
    """A MIG_DATA_WRITE got an ERROR reply; ``idx`` is the first idx its data came from."""


class SocketPipeline:
    """The socket, the receive buffer and the reply parsing both pipelines share."""

    def __init__(
        self,
        sock: socket.socket,
        where: str,
        *,
        timeout: float,
        window: int,
        buffer_size: int = 256 * 1024,
    ) -> None:
        if window < 1 or window > 0x8000:
            raise ValueError(f"window {window} is not within 1..32768")
        self.sock = sock
        self.where = where
        self.timeout = timeout
        self.window = window
        self.broken = False
        self._next_id = 0
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0  # parsed up to here
        self._end = 0  # received up to here
        self._eof = False

    def _new_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (msg_id + 1) & 0xFFFF
        return msg_id

    def _fail(self, exc: SinkError) -> SinkError:
        self.broken = True
        return exc

    def _protocol(self, text: str) -> ProtocolError:
        self.broken = True
        return ProtocolError(f"{self.where}: {text}")

    def _room(self, need: int) -> None:
        """Make room for a message of ``need`` bytes after the parsed ones."""
        if self._start == self._end:
            self._start = self._end = 0
        if len(self._buf) - self._start < need:
            tail = self._end - self._start
            # Through a copy: bytearray slice assignment from its own memory may memcpy.
            self._buf[:tail] = bytes(self._view[self._start : self._end])
            self._start, self._end = 0, tail
            if len(self._buf) < need:
                self._view.release()
                self._buf.extend(bytes(need - len(self._buf)))
                self._view = memoryview(self._buf)

    def _receive_nowait(self) -> bool:
        """Receive what the socket holds (without blocking); False if nothing came."""
        if self._end == len(self._buf):  # full: compact or grow, never recv into nothing
            self._room(self._end - self._start + 64 * 1024)
        try:
            n = self.sock.recv_into(self._view[self._end :])
        except BlockingIOError:
            return False
        except OSError as exc:
            raise self._fail(
                SinkError(f"{self.where}: receiving a reply failed ({exc})", errno=exc.errno)
            ) from exc
        if n == 0:
            self._eof = True
            raise self._fail(
                SinkError(
                    f"{self.where}: server closed the connection with {self.pending} "
                    "replies outstanding",
                    errno=_errno.ECONNRESET,
                )
            )
        self._end += n
        return True

    def _next_reply(self, command: int) -> tuple[int, int, memoryview] | None:
        """The next whole reply to ``command`` as (msg_id, errno or -1, payload), or None."""
        avail = self._end - self._start
        if avail < HEADER_SIZE:
            return None
        msg_id, cmd, size, flags, error_no = HEADER.unpack_from(self._buf, self._start)
        if size < HEADER_SIZE:
            raise self._protocol(f"message size {size} is below the header size {HEADER_SIZE}")
        if flags & FLAG_TYPE_MASK != FLAG_TYPE_REPLY or cmd != command:
            raise self._protocol(
                f"server sent {command_name(cmd)} msg_id {msg_id} with flags {flags:#x} "
                f"while {command_name(command)} replies were outstanding"
            )
        if avail < size:
            self._room(size)
            return None
        payload = self._view[self._start + HEADER_SIZE : self._start + size]
        self._start += size
        return msg_id, (error_no if flags & FLAG_ERROR else -1), payload

    def _outstanding(self, table: dict[int, _T], msg_id: int, command: int) -> _T:
        """Take the request ``msg_id`` answers out of ``table``; a reply to none breaks
        the protocol."""
        request = table.pop(msg_id, None)
        if request is None:
            raise self._protocol(
                f"server sent a {command_name(command)} reply to msg_id {msg_id}, "
                "which is not outstanding"
            )
        return request

    async def _wait(self, what: str, waiter: Callable[[socket.socket], Awaitable[object]]) -> None:
        """Await ``waiter(sock)`` within the timeout; a timeout names ``what``."""
        try:
            with trio.fail_after(self.timeout):
                await waiter(self.sock)
        except trio.TooSlowError as exc:
            raise self._fail(
                SinkError(
                    f"{self.where}: {what} took longer than {self.timeout:g} s "
                    f"({self.pending} replies outstanding)",
                    errno=_errno.ETIMEDOUT,
                )
            ) from exc

    async def _wait_readable(self) -> None:
        await self._wait("waiting for a reply", trio.lowlevel.wait_readable)

    @property
    def pending(self) -> int:
        raise NotImplementedError


class WritePipeline(SocketPipeline):
    """MIG_DATA_WRITEs with up to ``window`` in flight; see the module docstring."""

    def __init__(self, sock: socket.socket, where: str, *, timeout: float, window: int) -> None:
        super().__init__(sock, where, timeout=timeout, window=window)
        self.offset = 0  # stream offset of the next byte to send
        self._sent = 0  # writes sent
        self._inflight: dict[int, _Write] = {}  # msg_id -> write
        self._failed: list[_Write] = []
        self._since_checkpoint = 0

    @property
    def pending(self) -> int:
        return len(self._inflight)

    def _collect(self) -> None:
        """Match every whole reply received so far."""
        while True:
            reply = self._next_reply(WRITE)
            if reply is None:
                return
            msg_id, errno, _ = reply
            write = self._outstanding(self._inflight, msg_id, WRITE)
            if errno >= 0:
                write.errno = errno
                self._failed.append(write)

    def _poll(self) -> None:
        while self._receive_nowait():
            pass
        self._collect()

    async def _replies_until(self, pending: int) -> None:
        """Collect replies until at most ``pending`` writes are in flight, or (with
        ``pending`` > 0) one was refused."""
        self._poll()
        while len(self._inflight) > pending and not (pending and self._failed):
            await self._wait_readable()
            self._poll()

    async def write(self, writes: Iterable[tuple[list[memoryview], int, Tag]]) -> None:
        """Send one MIG_DATA_WRITE per ``(pieces, size, tag)``; raise `WriteFailed` instead
        once an earlier write was refused.

        The loop is synchronous while the window has room and the socket takes each
        message whole: it awaits only to wait (for replies, for room) and every
        `CHECKPOINT_BYTES`.
        """
        inflight = self._inflight
        sendmsg = self.sock.sendmsg
        pack = DATA_HEAD.pack
        for pieces, size, tag in writes:
            if self.broken:
                raise SinkError(f"{self.where}: connection is unusable after an earlier error")
            if len(inflight) >= self.window:
                # Down to half the window at once: one wakeup per half window, not per
                # write, and the server still has half a window queued meanwhile.
                await self._replies_until(self.window // 2)
            if self._failed:
                await self.flush()
            msg_id = self._next_id
            self._next_id = (msg_id + 1) & 0xFFFF
            total = DATA_HEAD_SIZE + size
            bufs: list[Buffer] = [
                pack(msg_id, WRITE, total, 0, 0, MIG_DATA_HEADER_SIZE + size, size)
            ]
            bufs += pieces
            try:
                sent = sendmsg(bufs)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._send_error(exc) from exc
            if sent != total:
                await self._send_rest(bufs, total, sent)
            inflight[msg_id] = _Write(self._sent, self.offset, size, tag)
            self._sent += 1
            self.offset += size
            self._since_checkpoint += size
            if self._since_checkpoint >= CHECKPOINT_BYTES:
                self._since_checkpoint = 0
                self._poll()
                await trio.lowlevel.checkpoint()

    def _send_error(self, exc: OSError) -> SinkError:
        return self._fail(
            SinkError(f"{self.where}: sending MIG_DATA_WRITE failed ({exc})", errno=exc.errno)
        )

    async def _send_rest(self, bufs: list[Buffer], total: int, sent: int) -> None:
        """Send the rest of a message of ``total`` bytes of which ``sent`` left already,
        waiting for room and reading the replies meanwhile."""
        partly = sent > 0
        try:
            while sent < total:
                if sent:
                    bufs = _advance(bufs, sent)
                    total -= sent
                    sent = 0
                await self._wait_sendable()
                if self._failed:
                    if partly:  # abandoned inside a message: the stream is out of step
                        self.broken = True
                        raise self._failure()
                    await self.flush()  # raises WriteFailed
                try:
                    sent = self.sock.sendmsg(bufs)
                except BlockingIOError:
                    sent = 0
                partly = partly or sent > 0
        except OSError as exc:
            raise self._send_error(exc) from exc
        except BaseException:
            if partly:
                self.broken = True  # inside a message: the stream is out of step
            raise

    async def _wait_sendable(self) -> None:
        """Wait for room in the socket, reading replies meanwhile; returns early once an
        ERROR reply came."""

        async def replies(scope: trio.CancelScope) -> None:
            while not self._failed:
                await trio.lowlevel.wait_readable(self.sock)
                self._poll()
            scope.cancel()

        async def room(sock: socket.socket) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(replies, nursery.cancel_scope)
                await trio.lowlevel.wait_writable(sock)
                nursery.cancel_scope.cancel()

        await self._wait("sending MIG_DATA_WRITE", room)

    async def flush(self) -> None:
        """Wait for the reply of every write in flight; then raise `WriteFailed` for the
        first refused one (the writes behind it are counted in its message)."""
        while self._inflight:
            if self._failed:
                # The server may have stopped reading after the refusal: the writes
                # behind it get a short grace, then count as unanswered.
                with trio.move_on_after(min(self.timeout, FAILURE_GRACE)):
                    await self._replies_until(0)
                if self._inflight:
                    self.broken = True
                break
            await self._replies_until(0)
        if self._failed:
            raise self._failure()

    def _failure(self) -> WriteFailed:
        first = min(self._failed, key=lambda w: w.seq)
        behind = self._sent - first.seq - 1
        refused = sum(1 for w in self._failed if w.seq > first.seq)
        unanswered = len(self._inflight)
        idx = "" if first.tag is None else f", data of idx {first.tag[0]}..{first.tag[1] - 1}"
        text = (
            f"{self.where}: MIG_DATA_WRITE ({first.size} bytes at stream offset "
            f"{first.offset}{idx}) failed with {describe_errno(first.errno)}"
        )
        if behind:
            counts = [f"{behind - refused - unanswered} taken", f"{refused} refused"]
            if unanswered:
                counts.append(f"{unanswered} unanswered")
            text += f"; {behind} writes were in flight behind it ({', '.join(counts)})"
        return WriteFailed(
            text,
            command=WRITE,
            idx=None if first.tag is None else first.tag[0],
            errno=first.errno or None,
        )


def _advance(bufs: Sequence[Buffer], n: int) -> list[Buffer]:
    """``bufs`` without their first ``n`` bytes."""
    i = 0
    while n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    return [bufs[i][n:], *bufs[i + 1 :]]
