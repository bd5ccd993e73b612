"""Admission: what a listener accepts, without letting strangers exhaust the process.

A connection is *pending* from its accept until its owner admits it (a data channel's
handshake was accepted, a control connection sent its first valid message) or refuses
it. Pending connections are bounded by a cap: when a new one arrives at the cap, the
pending connection silent the longest (its last byte, or its accept if it sent none, is
the oldest; among equals the one that sent the fewest bytes) is evicted: its owner's
`Pending.evictable` scope is cancelled and the owner closes it. A real peer sends its
handshake at once, so it is the least silent connection and gets in while strangers keep
coming.

"At once" must not depend on how fast strangers come: a flood turns the cap over in a
few milliseconds (a burst of accepts at the cap evicted every connection of the burst
before, their handshakes still unread in their sockets). So a connection is evictable
only once it is `EVICT_GRACE` seconds past its accept *and* none of its bytes wait unread
in its socket (its owner has not run since they came). At the cap with none evictable,
the listener accepts nothing until a place frees or a connection comes out of its grace:
newcomers wait in the kernel's backlog, in order, and a real peer whose handshake came
within the grace is never evicted, however many strangers arrive.

Accept errors that mean the process or the system is out of something (EMFILE, ENFILE,
ENOBUFS, ENOMEM, as trio's ``serve_listeners`` treats them) never end the accept loop.
Pending connections are evicted to free their fds: fds are the process's, so the ones
silent the longest of any admission accepting in the process, `RESERVE` of them when a
burst starts and one per error after that. Their admissions' caps are lowered to what
they hold (never below the admission's ``floor``), so that the fds freed stay free for
the session's own use (real channels, config files). With none pending, the loop sleeps
and retries. A burst is logged in two lines: when it starts, and at the first accept
after `BURST_GAP` quiet seconds. Refusals and evictions log at most one line per
`LOG_INTERVAL` each; the rest are counted (`AdmissionStatistics`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import socket
import struct
import termios
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from vfiomig._logs import event
from vfiomig.transport._sockets import Listener

log = logging.getLogger("vfiomig")

#: accept(2) errors that mean a resource is exhausted, not that the listener broke.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds to wait before accepting again when nothing could be evicted (trio's figure).
ACCEPT_RETRY_SLEEP = 0.1
#: Seconds to wait after evicting a connection to free an fd: its owner closes it when it
#: next runs, which is one scheduling round away.
EVICT_SLEEP = 0.005
#: Seconds between two log lines about refused (or evicted) connections of one listener.
LOG_INTERVAL = 5.0
#: Seconds without an accept error that end a burst of them (for the log).
BURST_GAP = 5.0
#: Pending connections evicted when a burst of accept errors starts: fds kept free.
RESERVE = 8
#: Seconds after its accept during which a pending connection is never evicted: the time
#: a real peer has to get its handshake to us (it sends it as soon as it connected), and
#: what a stranger's place lasts at least (so the cap turns over at most ``max_pending /
#: EVICT_GRACE`` times a second).
EVICT_GRACE = 0.25


def default_max_pending(channels: int) -> int:
    """The data listeners' default pending cap: room for every channel four times over."""
    return 4 * channels + 16


@dataclass(frozen=True, slots=True)
class AdmissionStatistics:
    """Counts of one listener's (or one group of listeners') connections."""

    pending: int  # accepted, neither admitted nor refused yet
    admitted: int
    refused: int  # closed by their owner: bad handshake, timeout, no room
    evicted: int  # closed to make room for newer connections (or to free an fd)
    accept_errors: int  # accepts that failed for want of a resource (EMFILE and kin)


class Pending:
    """One pending connection. Its owner runs each step before admission (a TLS, then a
    protocol handshake) inside a scope from `evictable`, and reports the bytes it reads
    with `note`."""

    __slots__ = (
        "_scope",
        "accepted",
        "done",
        "evicted",
        "label",
        "last_active",
        "received",
        "seq",
        "sock",
    )

    def __init__(
        self, label: str, now: float, seq: int, sock: trio.socket.SocketType | None = None
    ) -> None:
        self.label = label
        self.seq = seq  # order of accept: the tie-break between equals
        self.sock = sock  # to see bytes that came but are not read yet (None: unknown)
        self._scope = trio.CancelScope()
        self.accepted = now
        self.last_active = now  # accepted, or its latest byte
        self.received = 0
        self.evicted = False
        self.done = False  # admitted, refused or evicted: no longer pending

    def evictable(self) -> trio.CancelScope:
        """A cancel scope for the next step; an eviction cancels it (at once if the
        connection was evicted already). Check `evicted` after it."""
        self._scope = trio.CancelScope()
        if self.evicted:
            self._scope.cancel()
        return self._scope

    def note(self, nbytes: int) -> None:
        """``nbytes`` arrived from the peer (0: nothing, e.g. end of stream)."""
        if nbytes and not self.done:
            self.received += nbytes
            self.last_active = trio.current_time()


class Admission:
    """The pending connections of one or more listeners, bounded by ``max_pending``
    (lowered when the process runs out of fds, to no less than ``floor``, by default
    the smaller of ``max_pending`` and 4).

    ``prefix`` starts this admission's log lines (``"control: "``); connection labels
    follow it.
    """

    def __init__(
        self, max_pending: int, *, floor: int = 4, prefix: str = "", grace: float = EVICT_GRACE
    ) -> None:
        if max_pending < 1 or floor < 1:
            raise ValueError(f"max_pending {max_pending} or floor {floor} is below 1")
        self.max_pending = max_pending
        self.floor = min(floor, max_pending)
        self.prefix = prefix
        self.grace = grace
        self._pending: set[Pending] = set()
        self._left = trio.lowlevel.ParkingLot()  # `wait_for_place`, woken when one leaves
        self._seq = 0
        self._admitted = 0
        self._refused = 0
        self._evicted = 0
        self._accept_errors = 0
        self._short_since: float | None = None  # first accept error of the current burst
        self._short_last = 0.0  # the latest one
        self._short_count = 0
        self._refuse_log = Throttle("connection_refused")
        self._evict_log = Throttle("connection_evicted")

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            pending=len(self._pending),
            admitted=self._admitted,
            refused=self._refused,
            evicted=self._evicted,
            accept_errors=self._accept_errors,
        )

    async def accept(self, listener: Listener) -> trio.SocketStream:
        """The next connection of ``listener``; waits out a shortage of fds or memory.

        Waits first for a place (`wait_for_place`): at the cap with every pending
        connection in its grace, the next one waits in the kernel's backlog.

        Raises:
            OSError: any accept error other than `ACCEPT_CAPACITY_ERRNOS` (the listener
                is broken).

        Cancellation: nothing accepted is lost (trio's accept is atomic on cancel).
        """
        _LIVE[self] = _LIVE.get(self, 0) + 1
        try:
            while True:
                await self.wait_for_place()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    await self._short_of(exc.errno)
                    continue
                self._end_burst(trio.current_time())
                return stream
        finally:
            _LIVE[self] -= 1
            if not _LIVE[self]:
                del _LIVE[self]

    async def accept_burst(
        self, listener: Listener, twin: socket.socket
    ) -> list[trio.SocketStream]:
        """The next connection of ``listener`` (as `accept`) and those already waiting
        behind it, as many as there are places (`places`, at least the first), the rest
        taken through ``twin`` (`nonblocking_twin`) without a checkpoint between them.

        Channels that connect together then start together: an accept per scheduling
        round, while the first channels stream, let a 16-channel sender's first channel run
        150 ms ahead of its last, and its packets queue for the others meanwhile.
        """
        streams = [await self.accept(listener)]
        room = self.places()  # none entered yet: the first one takes one of them
        while len(streams) < room:
            try:
                conn, _ = twin.accept()
            except OSError:  # none waiting; any other error is the next accept()'s
                break
            streams.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
        return streams

    def _end_burst(self, now: float) -> None:
        if self._short_since is not None and now - self._short_last >= BURST_GAP:
            log.warning(
                "%saccepting again after %d failed accepts over %.1f s",
                self.prefix,
                self._short_count,
                self._short_last - self._short_since,
                extra=event("accept_burst_end", failed=self._short_count),
            )
            self._short_since = None

    async def _short_of(self, code: int) -> None:
        now = trio.current_time()
        self._end_burst(now)
        self._accept_errors += 1
        self._short_count += 1
        self._short_last = now
        if self._short_since is None:
            self._short_since = now
            self._short_count = 1
            log.warning(
                "%saccept failed: %s (%s): evicting the pending connections silent the "
                "longest and retrying; logged again once accepting works for %g s",
                self.prefix,
                os.strerror(code),
                errno.errorcode.get(code, code),
                BURST_GAP,
                extra=event("accept_burst_start", errno=errno.errorcode.get(code, code)),
            )
        why = f"out of resources ({errno.errorcode.get(code, code)})"
        if _free(RESERVE if self._short_count == 1 else 1, why):
            await trio.sleep(EVICT_SLEEP)
        else:
            await trio.sleep(ACCEPT_RETRY_SLEEP)

    def enter(self, label: str, sock: trio.socket.SocketType | None = None) -> Pending:
        """Register a connection just accepted (``sock``: its socket, whose unread bytes
        keep it from eviction); at the cap, evict another one first.

        At the cap with none evictable (every one in its grace or with bytes unread), the
        connection enters over the cap: that happens only when another listener of this
        admission took the last place while this one's accept waited, so the cap is
        passed by at most one connection per extra listener, and no connection in its
        grace is ever evicted.
        """
        while len(self._pending) >= self.max_pending:
            victim = self._victim()
            if victim is None:
                break
            self._evict_ticket(victim, f"pending limit {self.max_pending}")
        self._seq += 1
        ticket = Pending(label, trio.current_time(), self._seq, sock)
        self._pending.add(ticket)
        return ticket

    def places(self) -> int:
        """How many connections `enter` can take now without passing the cap: the free
        places and the evictable connections."""
        free = max(0, self.max_pending - len(self._pending))
        return free + len(self._evictable(trio.current_time()))

    async def wait_for_place(self) -> None:
        """Return once `places` is above zero: a place frees, a pending connection comes
        out of its grace, or one past it has its unread bytes read (its owner runs
        within a scheduling round: looked at again after `EVICT_SLEEP`)."""
        while not self.places():
            now = trio.current_time()
            if self._aged(now):  # past their grace, so bytes unread: read any moment
                until = now + EVICT_SLEEP
            else:
                until = min(t.accepted for t in self._pending) + self.grace
            with trio.move_on_at(until):
                await self._left.park()

    def admit(self, ticket: Pending) -> None:
        """``ticket``'s handshake is done: it no longer counts as pending."""
        if not ticket.done:
            self._leave(ticket)
            self._admitted += 1

    def refuse(self, ticket: Pending | None, label: str, why: str) -> None:
        """Count and log (throttled) a refused connection; its owner closes it."""
        if ticket is not None:
            if ticket.done:
                return
            self._leave(ticket)
        self._refused += 1
        self._refuse_log("%s%s: refused: %s", self.prefix, label, why)

    def release(self, ticket: Pending) -> None:
        """``ticket``'s owner ended without admitting or refusing it (a cancel, a lost
        connection): it stops counting as pending, and is counted nowhere."""
        if not ticket.done:
            self._leave(ticket)

    def _leave(self, ticket: Pending) -> None:
        ticket.done = True
        self._pending.discard(ticket)
        if self._left:
            self._left.unpark_all()

    def _aged(self, now: float) -> list[Pending]:
        """The pending connections past their grace, silent the longest first."""
        return sorted((t for t in self._pending if now - t.accepted >= self.grace), key=_silence)

    def _evictable(self, now: float) -> list[Pending]:
        """The pending connections past their grace with no bytes unread, silent the
        longest first."""
        return [t for t in self._aged(now) if not _unread(t)]

    def _victim(self) -> Pending | None:
        """The evictable connection silent the longest, if any (one FIONREAD each, in
        eviction order, until one has nothing unread)."""
        return next((t for t in self._aged(trio.current_time()) if not _unread(t)), None)

    def _evict_ticket(self, victim: Pending, why: str) -> None:
        self._leave(victim)
        victim.evicted = True
        victim._scope.cancel()
        self._evicted += 1
        self._evict_log(
            "%s%s: evicted: sent %d bytes, silent %.1f s (%s)",
            self.prefix,
            victim.label,
            victim.received,
            trio.current_time() - victim.last_active,
            why,
        )

    def _hold(self) -> None:
        """Lower the cap to the connections pending now (an fd was freed for good)."""
        cap = max(self.floor, len(self._pending))
        if cap < self.max_pending:
            self.max_pending = cap
            log.warning(
                "%spending limit lowered to %d: out of fds",
                self.prefix,
                cap,
                extra=event("pending_limit_lowered", limit=cap),
            )


#: The admissions of the process with an accept under way (and how many): an fd
#: shortage is the whole process's, so eviction chooses among all of them.
_LIVE: weakref.WeakKeyDictionary[Admission, int] = weakref.WeakKeyDictionary()


@contextmanager
def nonblocking_twin(listener: Listener) -> Iterator[socket.socket]:
    """A non-blocking stdlib socket on a duplicate of ``listener``'s fd, for
    `Admission.accept_burst`; closed on exit (the listener stays open)."""
    twin = socket.socket(fileno=os.dup(listener.socket.fileno()))
    try:
        twin.setblocking(False)
        yield twin
    finally:
        twin.close()


def _silence(ticket: Pending) -> tuple[float, int, int]:
    """Eviction order: silent the longest first, then fewest bytes, then oldest."""
    return (ticket.last_active, ticket.received, ticket.seq)


def _unread(ticket: Pending) -> int:
    """Bytes in ``ticket``'s socket that its owner has not read yet (0 when unknown)."""
    if ticket.sock is None:
        return 0
    # Its owner may have closed it and not released the ticket yet (a stream's aclose
    # checkpoints after the close): fileno() is then -1, which ioctl refuses with a
    # ValueError, not an OSError.
    fd = ticket.sock.fileno()
    if fd < 0:
        return 0
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:  # closed meanwhile
        return 0
    return int(struct.unpack("i", raw)[0])


def _free(count: int, why: str) -> int:
    """Evict up to ``count`` pending connections, silent the longest of any admission
    (evictable ones only: past their grace, nothing unread), and lower their admissions'
    caps (`Admission._hold`); the number evicted."""
    owners: dict[Admission, int] = {}
    now = trio.current_time()
    for _ in range(count):
        candidates = [(t, a) for a in _LIVE for t in a._evictable(now)[:1]]
        if not candidates:
            break
        ticket, owner = min(candidates, key=lambda c: _silence(c[0]))
        owner._evict_ticket(ticket, why)
        owners[owner] = owners.get(owner, 0) + 1
    for owner in owners:
        owner._hold()
    return sum(owners.values())


class MeteredStream(trio.abc.Stream):
    """``stream`` with every receive reported to a pending connection (`Pending.note`):
    the bytes of a TLS handshake count as activity, though no layer above sees them."""

    def __init__(self, stream: trio.abc.Stream, ticket: Pending) -> None:
        self.stream = stream
        self.ticket = ticket

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        self.ticket.note(len(data))
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


class Throttle:
    """Logs a line, then at most one per `LOG_INTERVAL`, saying how many were skipped;
    each line is the event ``name`` (with the ``skipped`` count)."""

    def __init__(self, name: str, logger: logging.Logger | None = None) -> None:
        self.name = name
        self.log = logger or log
        self.next_at = -math.inf
        self.skipped = 0

    def __call__(self, fmt: str, *args: object) -> None:
        now = trio.current_time()
        if now < self.next_at:
            self.skipped += 1
            return
        if self.skipped:
            fmt += " (and %d more like it since the last such line)"
            args = (*args, self.skipped)
        self.log.warning(fmt, *args, extra=event(self.name, skipped=self.skipped))
        self.skipped = 0
        self.next_at = now + LOG_INTERVAL


__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "Admission",
    "AdmissionStatistics",
    "MeteredStream",
    "Pending",
    "Throttle",
    "default_max_pending",
]
