"""Signalling a client's eventfds without ever waiting for the client.

An eventfd opened non-blocking (QEMU's) is written as it is: a full one (its count at the
maximum) refuses the write with EAGAIN, and the interrupt is pending there anyway.

A blocking one (libvfio-user's samples make them) cannot be written safely from the
server's loop: its O_NONBLOCK flag belongs to the open file description, shared with the
client, so setting it would break the client's own blocking reads; RWF_NOWAIT is
EOPNOTSUPP for eventfds and reopening through /proc is ENXIO. A count read from
``/proc/self/fdinfo`` says whether a write would block *now*, but the client may fill its
eventfd between that check and the write, and a write that blocks stops every client of the
server until that one reads. So every write to a blocking eventfd goes to a
`Signallers` pool: a few threads, each writing to its own dup of the fd (so the server may
close its copy at any time), at most one write in flight per eventfd (a second signal while
one is in flight is the same pending interrupt), and a cap on the threads: once
`SIGNALLER_THREADS` writes are stuck on clients' full eventfds, further signals of other
blocking eventfds are refused (not delivered, said in a warning) rather than growing the
pool. A stuck write ends when its client reads the eventfd; one whose client died without
reading stays stuck for the life of the process (a daemon thread and one fd each, at most
`SIGNALLER_THREADS` of them).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import threading
from typing import Final

from vfiomig._logs import event

log = logging.getLogger("vfiomig")

#: An eventfd's largest count: a write that would pass it blocks (or fails, non-blocking).
EVENTFD_MAX: Final = 0xFFFF_FFFF_FFFF_FFFE
#: What ``/proc/self/fd`` names an eventfd.
EVENTFD_KIND: Final = "anon_inode:[eventfd]"
#: The most writes to blocking eventfds in flight (threads) in the process.
SIGNALLER_THREADS: Final = 16
#: How long an idle signaller thread waits for work before it ends.
IDLE_SECONDS: Final = 5.0

_ONE: Final = (1).to_bytes(8, "little")


def fd_kind(fd: int) -> str:
    """What ``fd`` is, as ``/proc/self/fd`` names it (``anon_inode:[eventfd]``,
    ``pipe:[N]``, ``socket:[N]``, a path); EBADF for a closed fd."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise OSError(errno.EBADF, f"fd {fd}: {exc.strerror}") from None


def eventfd_state(fd: int) -> tuple[int, int | None]:
    """``(count, id)`` of the eventfd ``fd`` from ``/proc/self/fdinfo``; the id (the
    kernel's ``eventfd-id``, one per eventfd however many fds refer to it) is None on
    kernels that do not show it."""
    count: int | None = None
    ident: int | None = None
    with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
        for line in info:
            if line.startswith(b"eventfd-count:"):
                count = int(line.split(b":", 1)[1], 16)
            elif line.startswith(b"eventfd-id:"):
                ident = int(line.split(b":", 1)[1])
    if count is None:
        raise OSError(errno.EINVAL, f"fd {fd} is not an eventfd")
    return count, ident


class Signallers:
    """Threads that write 1 to blocking eventfds, at most ``limit`` of them at once.

    `signal` never blocks (beyond a ``dup``): it hands the write to an idle thread, starts
    one while fewer than ``limit`` exist, or refuses. Thread-safe.
    """

    def __init__(self, limit: int = SIGNALLER_THREADS) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[object, int]] = collections.deque()
        #: The eventfds (by id) with a write queued or in flight.
        self._pending: set[object] = set()
        self._threads = 0
        self._idle = 0
        self._refusing = False

    def busy(self) -> int:
        """Writes queued or in flight (for tests and tools)."""
        with self._cond:
            return len(self._pending)

    def threads(self) -> int:
        """Signaller threads alive (for tests and tools)."""
        with self._cond:
            return self._threads

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no write is queued or in flight; False if
        some still are (stuck on a client's full eventfd)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout)

    def signal(self, key: object, fd: int) -> bool:
        """Write 1 to ``fd`` from a signaller thread: True if handed over (or a write to the
        same eventfd, ``key``, is in flight already), False if every thread is stuck."""
        with self._cond:
            if key in self._pending:
                return True
            if len(self._jobs) >= self._idle and self._threads >= self.limit:
                if not self._refusing:
                    self._refusing = True
                    log.warning(
                        "vfio-user: %d interrupt writes are stuck on clients' full blocking "
                        "eventfds; interrupts on other blocking eventfds are not delivered "
                        "until one of those clients reads its eventfd",
                        self._threads,
                        extra=event("vfio_user_signallers_stuck", threads=self._threads),
                    )
                return False
            copy = os.dup(fd)
            self._pending.add(key)
            self._jobs.append((key, copy))
            if len(self._jobs) > self._idle:
                self._threads += 1
                threading.Thread(target=self._work, name="vfio-user-signal", daemon=True).start()
            else:
                self._cond.notify()
        return True

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._jobs:
                    if not self._cond.wait(IDLE_SECONDS) and not self._jobs:
                        self._idle -= 1
                        self._threads -= 1
                        return
                self._idle -= 1
                key, fd = self._jobs.popleft()
            try:
                os.write(fd, _ONE)
            except OSError:
                pass  # the client's eventfd: its failure is the client's
            finally:
                os.close(fd)
                with self._cond:
                    self._pending.discard(key)
                    self._refusing = False
                    if not self._pending:
                        self._cond.notify_all()


#: The process's signallers (every server and device shares the cap).
SIGNALLERS: Final = Signallers()


def signal_eventfd(fd: int) -> bool:
    """Add 1 to the eventfd ``fd`` without ever blocking: False if it was full (the
    reader has an interrupt pending already), failed (both are the client's), or is a
    blocking eventfd while every signaller thread is stuck. A blocking eventfd is written
    by a `SIGNALLERS` thread, so True means the write is on its way."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
            os.write(fd, _ONE)
            return True
        count, ident = eventfd_state(fd)
        if count >= EVENTFD_MAX:
            return False  # full: the client has an interrupt pending already
        return SIGNALLERS.signal(fd if ident is None else ("eventfd", ident), fd)
    except OSError:
        return False
