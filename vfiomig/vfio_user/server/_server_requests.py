"""The server's own requests to its client: the DMA_READ / DMA_WRITE an emulator's task
sends through `Dma.read` / `Dma.write` (`ServerRequests.request`), and their replies.

A request is sent on the connection's socket and its task parks until the reply comes,
matched by msg_id (`_Pending`). The connection's task delivers replies it frames
(`ServerRequests.deliver`); a requesting task also takes its reply off the socket itself
when it is already there whole and next (`ServerRequests._take_reply`), or comes within
a brief wait (`BriefWait`, shared with the connection's reads), which saves the hand-over
between the two tasks. `Connection` (``_connection``) is the rest: receiving,
framing, answering.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Sequence
from typing import Final

import trio

from vfiomig.vfio_user._header import (
    FLAG_ERROR,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER,
    HEADER_SIZE,
    command_name,
)
from vfiomig.vfio_user.server._regions import Buffer

#: How long an emulator's DMA_READ / DMA_WRITE waits for the client's reply.
DMA_REPLY_TIMEOUT: Final = 10.0
#: Room for the most fds one recvmsg can carry (SCM_MAX_FD).
ANC_SIZE: Final = socket.CMSG_SPACE(253 * 4)
#: The longest the server blocks its thread for a message expected within microseconds
#: (a one-at-a-time client's next register access, the reply to a DMA request) rather
#: than park in trio's scheduler (`BriefWait`).
BRIEF_WAIT: Final = 100e-6
#: After this many brief waits in a row that saw nothing (a client that takes longer,
#: a host too busy to run it), they are skipped ...
BRIEF_MISSES: Final = 4
#: ... except one in this many, to notice when they pay again.
BRIEF_PROBE: Final = 64
_FD_SETSIZE: Final = 1024  # select() takes no fd at or above it


class BriefWait:
    """One connection's short blocking waits for its socket (``wait(sock)``).

    Parking in trio and being woken costs a scheduler pass (an epoll_ctl, an epoll_wait
    and the run loop around them: half the server's CPU per 4-byte REGION_READ); a
    client that answers within microseconds is caught by one select() instead, as
    libvfio-user's blocking recv catches it. A wait that sees nothing costs a sleep and
    a wakeup on top of the scheduler pass, so after `BRIEF_MISSES` of them in a row
    only one wait in `BRIEF_PROBE` is tried until one sees the client again.
    """

    __slots__ = ("misses", "skipped")

    def __init__(self) -> None:
        self.misses = 0
        self.skipped = 0

    @property
    def active(self) -> bool:
        """False while the waits are skipped (after `BRIEF_MISSES` that saw nothing)."""
        return self.misses < BRIEF_MISSES

    def __call__(self, sock: socket.socket) -> bool:
        """Whether ``sock`` became readable within `BRIEF_WAIT` (False at once when a
        task is ready to run, a deadline falls due sooner, or the waits do not pay).
        Other sockets' I/O and calls from other threads (`trio.from_thread`) are served
        at most `BRIEF_WAIT` late."""
        if self.misses >= BRIEF_MISSES:
            self.skipped += 1
            if self.skipped % BRIEF_PROBE:
                return False
        fd = sock.fileno()
        if not 0 <= fd < _FD_SETSIZE:
            return False
        stats = trio.lowlevel.current_statistics()
        if stats.tasks_runnable or stats.run_sync_soon_queue_size:
            return False
        window = min(BRIEF_WAIT, stats.seconds_to_next_deadline)
        if window <= 0:
            return False
        if select.select([fd], [], [], window)[0]:
            self.misses = 0
            return True
        self.misses += 1
        return False


class ConnectionLost(Exception):
    """The client's byte stream cannot be framed any more (or it sent a stray reply)."""


class ServerRequests:
    """The request half of a connection (a base of `Connection`, which owns the state
    declared here: the socket, its receive buffer and where the next message starts)."""

    sock: socket.socket
    view: memoryview
    start: int
    end: int
    base: int
    idle: bool
    wait_first: bool
    next_id: int
    pending: dict[int, _Pending]
    brief_wait: BriefWait

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
        raise NotImplementedError  # `Connection._send`

    async def request(self, command: int, payload: bytes) -> bytes:
        """Send a DMA_READ / DMA_WRITE to the client and wait for its reply payload.

        Raises:
            OSError: the client's errno, ENOTCONN if it went away, ETIMEDOUT after
                `DMA_REPLY_TIMEOUT` seconds. Cancellation: the reply is ignored.
        """
        while self.next_id in self.pending:
            self.next_id = (self.next_id + 1) & 0xFFFF
        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        waiter = _Pending(command)
        self.pending[msg_id] = waiter
        try:
            await self._send(msg_id, command, [payload], [], None, reply=False)
            if waiter.result is None and self.idle:
                # One look for the reply: after a brief wait while those pay (a client on
                # another core answers within microseconds), else at once (a client the
                # host ran before this task got the CPU back has answered already).
                if self.brief_wait.active:
                    self.brief_wait(self.sock)
                self._take_reply(msg_id, waiter)
            if waiter.result is None:  # the reply may have come while the send waited
                with trio.move_on_after(DMA_REPLY_TIMEOUT):
                    await waiter.wait()
        finally:
            waiter.task = None
            del self.pending[msg_id]
        result = waiter.result
        if result is None:
            raise OSError(errno.ETIMEDOUT, f"{command_name(command)} got no reply")
        if isinstance(result, int):
            raise OSError(result, f"{command_name(command)} failed: {os.strerror(result)}")
        return result

    def _take_reply(self, msg_id: int, waiter: _Pending) -> bool:
        """Take the reply to ``msg_id`` off the socket in the requesting task, if it is
        already there whole and is the next message of the stream: True if it was.

        Only while the connection's task is parked between messages (``idle``): the next
        message is then the one it would read next, and taking it here saves that task's
        wakeup and the hand-over (two scheduler rounds per DMA). A client that answers
        before the emulator's task gets the CPU back (a busy host, a pipelining client)
        finds its reply taken at once; otherwise nothing is consumed (the bytes are only
        peeked) and the connection's task delivers it as usual.
        """
        scratch = self.view[self.end :]  # where that task would receive them
        try:
            seen = self.sock.recv_into(scratch, len(scratch), socket.MSG_PEEK)
        except BlockingIOError:
            return False
        if seen < HEADER_SIZE:
            return False
        rid, command, size, flags, error_no = HEADER.unpack_from(scratch)
        if (
            rid != msg_id
            or command != waiter.command
            or flags & FLAG_TYPE_MASK != FLAG_TYPE_REPLY
            or not HEADER_SIZE <= size <= seen
        ):
            return False  # not ours, or not whole yet: the connection's task reads it
        # No room for fds: a reply carries none, and the kernel closes any sent with it.
        nbytes = self.sock.recv_into(scratch, size)
        assert nbytes == size  # peeked whole; nothing else reads this socket meanwhile
        self.base += size  # stream bytes that never were in ``buf``
        self.deliver(rid, command, flags, error_no, scratch[HEADER_SIZE:size])
        return True

    def deliver(
        self, msg_id: int, command: int, flags: int, error_no: int, payload: memoryview
    ) -> None:
        waiter = self.pending.get(msg_id)
        if waiter is None or waiter.result is not None or waiter.command != command:
            raise ConnectionLost(
                f"client sent a {command_name(command)} reply to msg_id {msg_id}, not outstanding"
            )
        error = error_no if 0 < error_no < 4096 else errno.EIO
        waiter.result = error if flags & FLAG_ERROR else bytes(payload)
        waiter.wake()
        self.wait_first = self.start == self.end

    def fail_requests(self) -> None:
        """The client is gone: every request still waiting fails with ENOTCONN."""
        for waiter in self.pending.values():
            if waiter.result is None:  # a reply that arrived stays (its task has not run yet)
                waiter.result = errno.ENOTCONN
                waiter.wake()


class _Pending:
    """One DMA_READ / DMA_WRITE waiting for the client's reply (payload or errno). The
    waiting task is parked and rescheduled directly: an Event's parking lot costs more
    than the rest of the hand-over."""

    __slots__ = ("command", "result", "task")

    def __init__(self, command: int) -> None:
        self.command = command
        self.result: bytes | int | None = None
        self.task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        """Park until `wake` (returns at once if the result is in). Cancellable."""
        if self.result is not None:
            return
        self.task = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)
