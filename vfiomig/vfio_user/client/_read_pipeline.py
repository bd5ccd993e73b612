"""The MIG_DATA_READ pipeline of a vfio-user client (see `_pipeline` for the rules both
pipelines share): reads of ``size`` bytes with a window in flight; the data comes back in
request order and ends at the first reply carrying 0 bytes; data after that end is a
protocol error.

The data is never copied here: replies are received into an arena (a buffer of
`ARENA_REPLIES` replies) and each reply's data is handed out as a read-only view of it.
An arena that is full is retired, never written again while any view into it is alive
(a caller may keep the views as long as it likes); it is reused once the last one is
gone (the bytearray says so: it cannot change its size while views of it exist). Only
the part of a reply that was already received when its arena filled up is copied into
the next arena.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

import trio

from vfiomig._core._errors import SinkError
from vfiomig.vfio_user._header import HEADER_SIZE
from vfiomig.vfio_user._migration_bodies import DATA_HEAD, MIG_DATA_HEADER_SIZE, MIG_SIZES, READ
from vfiomig.vfio_user.client._pipeline import SocketPipeline, VfioUserCommandError, describe_errno

#: Replies an arena holds.
ARENA_REPLIES: Final = 8
#: Arenas without live views kept for reuse (more are freed).
SPARE_ARENAS: Final = 2


def _unshared(arena: bytearray) -> bool:
    """No view into ``arena`` is alive: a bytearray with views cannot change its size
    (BufferError). One byte off and back on costs no reallocation."""
    try:
        last = arena.pop()
    except BufferError:
        return False
    arena.append(last)
    return True


class ReadPipeline(SocketPipeline):
    """MIG_DATA_READs of ``size`` bytes with up to ``window`` in flight, until the device
    returns 0 bytes; see the module docstring."""

    def __init__(
        self, sock: socket.socket, where: str, *, timeout: float, window: int, size: int
    ) -> None:
        buffer_size = ARENA_REPLIES * (HEADER_SIZE + MIG_DATA_HEADER_SIZE + size)
        super().__init__(sock, where, timeout=timeout, window=window, buffer_size=buffer_size)
        self.size = size
        self._retired: list[bytearray] = []  # full arenas, views into them maybe alive
        self.arenas = 1  # allocated so far
        self.ended = False  # a reply carried 0 bytes
        #: An ERROR reply came: nothing more is asked, and the replies still owed are
        #: collected and dropped (`drain`), so the connection stays in step and the client
        #: can still set the device's state (a source's abort: back to RUNNING).
        self.failed = False
        self._order: dict[int, int] = {}  # msg_id -> request sequence, in flight
        self._sent = 0
        self._next = 0  # the sequence whose data comes next
        self._early: dict[int, memoryview] = {}  # data of replies that came before their turn
        self.offset = 0  # stream bytes received in order
        self._ready: list[memoryview] = []
        self._request = DATA_HEAD.pack(
            0, READ, HEADER_SIZE + MIG_DATA_HEADER_SIZE, 0, 0, MIG_DATA_HEADER_SIZE + size, size
        )

    @property
    def pending(self) -> int:
        return len(self._order)

    def _room(self, need: int) -> None:
        """Room for a message of ``need`` bytes after the parsed ones: in a fresh arena if
        this one is short of it (its handed-out views stay as they are)."""
        if len(self._buf) - self._start >= need:
            return
        tail = self._end - self._start
        arena = self._spare(max(need, len(self._buf)))
        arena[:tail] = self._view[self._start : self._end]
        self._view.release()  # views handed out keep their arena until they go
        self._retired.append(self._buf)
        self._buf, self._view = arena, memoryview(arena)
        self._start, self._end = 0, tail

    def _spare(self, size: int) -> bytearray:
        """A retired arena of at least ``size`` bytes no view refers to any more, or a
        new one."""
        found = None
        kept: list[bytearray] = []
        spare = 0
        for arena in self._retired:
            if not _unshared(arena):
                kept.append(arena)
            elif found is None and len(arena) >= size:
                found = arena
            elif spare < SPARE_ARENAS:
                kept.append(arena)
                spare += 1
        self._retired = kept
        if found is None:
            self.arenas += 1
            found = bytearray(size)
        return found

    def _ask(self) -> bool:
        """Send as many requests as the window and the socket take; False if none."""
        asked = False
        while not self.ended and not self.failed and len(self._order) < self.window:
            msg_id = self._new_id()
            request = bytearray(self._request)
            struct.pack_into("=H", request, 0, msg_id)
            try:
                n = self.sock.send(request)
            except BlockingIOError:
                return asked
            except OSError as exc:
                raise self._fail(
                    SinkError(
                        f"{self.where}: sending MIG_DATA_READ failed ({exc})", errno=exc.errno
                    )
                ) from exc
            if n != len(request):  # 24 bytes: only a broken socket splits them
                raise self._fail(SinkError(f"{self.where}: MIG_DATA_READ sent in part"))
            self._order[msg_id] = self._sent
            self._sent += 1
            asked = True
        return asked

    def _collect(self) -> None:
        while True:
            reply = self._next_reply(READ)
            if reply is None:
                return
            msg_id, errno, payload = reply
            seq = self._outstanding(self._order, msg_id, READ)
            if self.failed:
                continue  # owed behind the failed read: dropped, whatever it says
            if errno >= 0:
                self.failed = True
                raise VfioUserCommandError(
                    f"{self.where}: MIG_DATA_READ ({self.size} bytes at stream offset "
                    f"{self.offset}) failed with {describe_errno(errno)}",
                    command=READ,
                    errno=errno or None,
                )
            if len(payload) < MIG_DATA_HEADER_SIZE:
                raise self._protocol(
                    f"MIG_DATA_READ reply payload of {len(payload)} bytes is too short "
                    f"(min {MIG_DATA_HEADER_SIZE})"
                )
            _, got = MIG_SIZES.unpack_from(payload)
            if got > self.size or got > len(payload) - MIG_DATA_HEADER_SIZE:
                raise self._protocol(
                    f"mig data read returned {got} bytes (asked {self.size}, "
                    f"carried {len(payload) - MIG_DATA_HEADER_SIZE})"
                )
            data = payload[MIG_DATA_HEADER_SIZE : MIG_DATA_HEADER_SIZE + got].toreadonly()
            if seq != self._next:
                self._early[seq] = data
                continue
            self._take(data)
            while self._next in self._early:
                self._take(self._early.pop(self._next))

    def _take(self, data: memoryview) -> None:
        self._next += 1
        if not data:
            self.ended = True
        elif self.ended:
            raise self._protocol(f"mig data read returned {len(data)} bytes after the end")
        else:
            self._ready.append(data)
            self.offset += len(data)

    async def read(self, max_bytes: int) -> list[memoryview]:
        """At least one piece of the stream (at most ``max_bytes`` in all), or ``[]`` at
        its end; data beyond ``max_bytes`` stays for the next call. The pieces are
        read-only views that stay valid as long as the caller keeps them."""
        if self.failed:
            raise VfioUserCommandError(
                f"{self.where}: MIG_DATA_READ failed earlier (at stream offset {self.offset})",
                command=READ,
                errno=None,
            )
        while not self._ready and not (self.ended and not self._order):
            if not self._ask() and not self._order:
                await self._wait("sending MIG_DATA_READ", trio.lowlevel.wait_writable)
                continue
            if not self._receive_nowait():
                await self._wait_readable()
                self._receive_nowait()
            self._collect()
        out: list[memoryview] = []
        room = max_bytes
        while self._ready and room:
            piece = self._ready[0]
            if len(piece) <= room:
                out.append(self._ready.pop(0))
                room -= len(piece)
            else:
                out.append(piece[:room])
                self._ready[0] = piece[room:]
                room = 0
        self._ask()
        await trio.lowlevel.checkpoint()
        return out

    async def drain(self) -> None:
        """Collect the replies of the reads still in flight (after the end: 0 bytes;
        after a failed read: whatever they say), those received already first."""
        self._collect()
        while self._order:
            if not self._receive_nowait():
                await self._wait_readable()
                continue
            self._collect()
