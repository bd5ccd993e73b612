"""The saving side of the fake kernel device: the data fd of PRE_COPY and STOP_COPY.

A saving session starts when the device enters PRE_COPY (from RUNNING) or STOP_COPY (from
STOP); the data fd it returns serves the whole saving group (PRE_COPY -> PRE_COPY_P2P ->
STOP_COPY keep it). What it reads follows a `SavingModel`:

- in PRE_COPY, ``initial`` bytes of initial data, then what the running device dirtied:
  ``dirty(k)`` more bytes become readable when VFIO_MIG_GET_PRECOPY_INFO is called for the
  (k+2)-th time (time passes between two queries; the first one sees only initial data).
  With nothing readable a read fails with ENOMSG, the uAPI's temporary end of stream
  (mlx5), or returns 0 with ``precopy_end="EOF"`` (Linux's mtty sample, whose data fd
  gives more after STOP_COPY all the same);
- the ioctl reports ``(initial_bytes, dirty_bytes)`` of what is still unread, unless
  ``reported_dirty(k)`` makes it lie about dirty_bytes (no data behind the lie);
- entering STOP_COPY appends ``stop_copy`` bytes after whatever is still unread; once
  those are read, read() returns 0 (end of stream) for good. A session that starts in
  STOP_COPY (no precopy) holds the whole state: ``initial`` then ``stop_copy`` bytes;
- faults: ``max_read`` (short reads), ``read_errno_at`` (an errno from the read that would
  reach a byte offset of the session's stream).

A ``fed`` model makes the data fd real: one end of a UNIX socket pair that a thread
feeds with the STOP_COPY stream (a device without PRE_COPY), so that ``os.read``, poll()
and the C send path read it as they would a kernel device's fd; ``read_errno_at`` then
ends the stream at its offset with ECONNRESET (the one read error a socket can give:
its peer closed with a byte of its own unread), whatever errno it names; and
``keep=False`` keeps no copy of what it gave (a benchmark's gigabyte).

The bytes are cheap to make at any rate (a bench reads tens of MiB while the device is
stopped): one seeded pseudo-random block of `PERIOD` bytes (an odd length, so packets of
power-of-two sizes never line up with it), each piece starting at its own offset in it.
`SavingSession.saved` keeps every byte handed out, in order, so that a test compares it
with what the destination device loaded.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np

#: Bytes per round: a list (0 after its end) or a function of the round number.
PerRound: TypeAlias = "Sequence[int] | Callable[[int], int]"


#: How a PRE_COPY read says "nothing more for now": the uAPI's ENOMSG, or a 0-byte read.
PrecopyEnd: TypeAlias = Literal["ENOMSG", "EOF"]

#: The length of the block the data is cut from (a prime).
PERIOD = 1_048_583


def _block(seed: int) -> bytes:
    """The seeded block, twice over: any slice of up to `PERIOD` bytes is contiguous."""
    block = np.random.default_rng(seed).bytes(PERIOD)
    return block + block


def per_round(model: PerRound, k: int) -> int:
    if callable(model):
        return int(model(k))
    return model[k] if k < len(model) else 0


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class SavingModel:
    """What the fake device has to save, and how its saving data fd misbehaves."""

    stop_copy: int = 0
    initial: int = 0
    dirty: PerRound = ()
    reported_dirty: PerRound | None = None
    seed: int = 0
    max_read: int | None = None
    read_errno_at: tuple[int, int] | None = None
    precopy_end: PrecopyEnd = "ENOMSG"
    fed: bool = False
    keep: bool = True


@dataclass
class SavingSession:
    """One saving session: the read end of a pipe (its write end closed: the bytes come
    from the model, never through the pipe) and the bytes not yet read."""

    model: SavingModel
    precopy: bool
    fd: int = -1  # owned by the caller from the moment SET returns it
    pipe: tuple[int, int] = (0, 0)
    live: bool = True
    stop_copy: bool = False
    initial_left: int = 0
    dirty_left: int = 0
    queries: int = 0
    saved: bytearray = field(default_factory=bytearray)
    given: int = 0  # bytes handed out (all of `saved` when the model keeps them)
    _feeder: socket.socket | None = None
    _thread: threading.Thread | None = None
    _pending: deque[list[int]] = field(default_factory=deque)  # [bytes left, offset]
    _pieces: int = 0
    _block: bytes = b""

    def __post_init__(self) -> None:
        if self.model.fed:
            if self.precopy:
                raise ValueError("a fed saving model has no PRE_COPY data")
            ours, self._feeder = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._feeder.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            ours.send(b"\0")  # the feeder leaves it unread to end with ECONNRESET
            r = ours.detach()
        else:
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
        st = os.fstat(r)
        self.fd, self.pipe = r, (st.st_dev, st.st_ino)
        self._block = _block(self.model.seed)
        self._add(self.model.initial)
        if self.precopy:
            self.initial_left = self.model.initial
        else:
            self.enter_stop_copy()

    def _add(self, n: int) -> None:
        if n > 0:
            self._pending.append([n, (self._pieces * 7919 * 131) % PERIOD])
        self._pieces += 1

    def enter_stop_copy(self) -> None:
        self.stop_copy = True
        self._add(self.model.stop_copy)
        if self._feeder is not None:
            self._thread = threading.Thread(target=self._feed, name="fake-vfio-feeder")
            self._thread.start()

    def _feed(self) -> None:
        """The fed model's thread: the stream into the socket, then its end (EOF, or the
        reset that ``read_errno_at`` asks for); a reader that went away ends it early."""
        feeder = self._feeder
        assert feeder is not None
        failed = False
        try:
            while True:
                try:
                    if self.model.keep:
                        parts = [memoryview(self.read(1 << 20))]
                    else:  # sent from the block itself
                        parts = self.take(1 << 20)
                except OSError:
                    failed = True
                    break
                if not parts or not parts[0]:
                    break
                for part in parts:
                    feeder.sendall(part)
            if not failed:
                feeder.recv(1)  # nothing of ours left unread: the reader sees EOF
        except OSError:
            pass  # the reader closed its end, or `stop` shut ours down
        finally:
            feeder.close()

    def stop(self) -> None:
        """End the feeding thread (the session is over); idempotent."""
        if self._feeder is not None and self._thread is not None:
            try:
                self._feeder.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the thread
            self._thread.join()
            self._thread = None

    def precopy_info(self) -> tuple[int, int]:
        """``(initial_bytes, dirty_bytes)`` now; the device dirtied more since the last call."""
        if self.queries:
            n = per_round(self.model.dirty, self.queries - 1)
            self._add(n)
            self.dirty_left += n
        self.queries += 1
        lie = self.model.reported_dirty
        dirty = self.dirty_left if lie is None else per_round(lie, self.queries - 1)
        return self.initial_left, dirty

    def read(self, n: int) -> bytes:
        parts = self.take(n)
        out = parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
        if self.model.keep:
            self.saved += out
        return out

    def take(self, n: int) -> list[memoryview]:
        """`read`'s bytes as views of the block (`_feed` sends them without a copy); what
        the session gave goes into `saved` only through `read`."""
        if not self._pending:
            if self.stop_copy or self.model.precopy_end == "EOF":
                return []
            raise _oserror(errno.ENOMSG)
        if self.model.max_read is not None:
            n = min(n, self.model.max_read)
        if self.model.read_errno_at is not None:
            offset, code = self.model.read_errno_at
            if self.given + n > offset:
                if self.given >= offset:
                    raise _oserror(code)
                n = offset - self.given
        parts: list[memoryview] = []
        got = 0
        block = memoryview(self._block)
        while self._pending and got < n:
            head = self._pending[0]
            take = min(n - got, head[0], PERIOD)
            parts.append(block[head[1] : head[1] + take])
            got += take
            head[0] -= take
            head[1] = (head[1] + take) % PERIOD
            if not head[0]:
                self._pending.popleft()
        from_initial = min(got, self.initial_left)
        self.initial_left -= from_initial
        self.dirty_left = max(0, self.dirty_left - (got - from_initial))
        self.given += got
        return parts
