"""One data channel of the sender: its queue of packets and the task that writes it.

`_Writer` owns the channel's `Outbox` (the core's): producers put packets there, and the
channel's task writes them in queue order, in batches on a socket (one ``sendmsg`` per
IOV_MAX iovecs with the C core, ``writev`` of the views with the pure one), when paced
(``channel_rate``, or a `_Link` shared by every channel) each packet once the link model
could have carried it (those due together in one write), whole packets
with ``send_all`` on any other stream (TLS). It wakes producers waiting for room.
"""

from __future__ import annotations

import math
import os

import trio

from vfiomig import _core as core
from vfiomig.send._close import channel_error
from vfiomig.send._types import SendError, SendStatus

#: Bytes read from a stream source at once (whole packets, at least one) and spread over
#: the channels with one call into the core; also what `_Writer.take` sends at once.
CHUNK = 1 << 20
#: idx0-last: a channel stuck in one send this long counts as blocked by the receiver.
BLOCKED_AFTER = 0.3
#: A paced channel with nothing due sleeps until its head packet is due and this much
#: longer (seconds), so that each wakeup sends a burst: a packet leaves at most this late
#: (never early), and the lateness does not add up (the schedule is rate x elapsed).
PACE_QUANTUM = 0.001


class Progress:
    """Sends completed by the channels other than a held one (idx0-last)."""

    def __init__(self) -> None:
        self.count = 0
        self.open = 0


class Link:
    """The shared link of a total rate: every channel's bytes count against it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = trio.current_time()
        self.sent = 0


class Writer:
    """One channel: its `Outbox` of packets and the task that writes them in queue order.

    On a socket the task writes many packets with one ``sendmsg`` (the C core's
    ``Outbox.send``; the pure core's views with ``writev``) and waits for the socket to
    take more; on any other stream (TLS) it sends whole packets with ``send_all``. A
    paced channel writes each packet once the rate allows it, those due together in one
    write. A writer
    with ``hold`` set sends nothing until the other channels have all finished or made no
    progress for `BLOCKED_AFTER` seconds (blocked by the receiver).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        rate: float | None,
        progress: Progress,
        hold: bool,
        status: SendStatus,
        link: Link | None = None,
    ) -> None:
        self.stream = stream
        self.outbox = core.Outbox()
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.idle = trio.lowlevel.ParkingLot()  # the task, waiting for packets
        self.room = trio.lowlevel.ParkingLot()  # producers, waiting for this queue to shrink
        self.limit = 0  # queued bytes above which producers wait (set by the dispatcher)
        self.closed = False  # no more packets will come
        self.rate = rate
        self.link = link
        self.sent = 0
        self.progress = progress
        self.hold = hold
        self.status = status

    def wake(self) -> None:
        if self.idle:
            self.idle.unpark_all()

    def close(self) -> None:
        self.closed = True
        self.wake()

    async def run(self, channel: int, failures: list[SendError], scope: trio.CancelScope) -> None:
        if self.hold:
            await self._wait_for_others()
        else:
            self.progress.open += 1
        try:
            await self._send_queue()
        except (OSError, trio.BrokenResourceError) as exc:
            tls = isinstance(self.stream, trio.SSLStream)
            failures.append(channel_error(channel, self.sent, exc, tls=tls))
            scope.cancel()
        finally:
            if not self.hold:
                self.progress.open -= 1
            self.outbox.clear()

    async def _wait_for_others(self) -> None:
        last, since = -1, trio.current_time()
        while self.progress.open or last < 0:
            await trio.sleep(BLOCKED_AFTER / 6)
            now = trio.current_time()
            if self.progress.count != last:
                last, since = self.progress.count, now
            elif now - since >= BLOCKED_AFTER:
                return

    async def _send_queue(self) -> None:
        start = trio.current_time()
        outbox = self.outbox
        paced = bool(self.rate) or self.link is not None
        while True:
            if not outbox.queued_packets:
                if self.closed:
                    return
                await self.idle.park()
            elif paced:
                await self._send_paced(start)
            else:
                await self._write(-1)

    async def _send_paced(self, start: float) -> None:
        # Pace to the link model before sending: a packet leaves once the link could have
        # carried it, so no channel is ever ahead of rate * elapsed and the receiver
        # cannot beat bytes / rate. Every packet already due leaves in one write; when
        # none is, the channel sleeps until the head is due plus `PACE_QUANTUM`, so that a
        # burst leaves per wakeup, not one packet (4 KiB packets at 32 MiB/s are 8,192
        # wakeups a second per channel: more CPU than the sender has).
        outbox, link = self.outbox, self.link
        now = trio.current_time()
        due = math.inf
        if self.rate:
            due = (now - start) * self.rate - self.sent
        if link is not None:
            due = min(due, (now - link.start) * link.rate - link.sent)
        count, nbytes = outbox.fits(max(int(due), 0))
        if not count:
            head = outbox.head_size
            wake = now
            if self.rate:
                wake = max(wake, start + (self.sent + head) / self.rate)
            if link is not None:
                wake = max(wake, link.start + (link.sent + head) / link.rate)
            await trio.sleep_until(wake + PACE_QUANTUM)
            return
        self.sent += nbytes
        if link is not None:
            link.sent += nbytes
        target = outbox.sent_packets + count
        while outbox.sent_packets < target:
            await self._write(target - outbox.sent_packets)

    async def _write(self, max_packets: int) -> None:
        """Write what the socket takes of the first ``max_packets`` packets (-1: all);
        wait for it to take more when it took none of them whole."""
        outbox = self.outbox
        before, packets = outbox.sent_bytes, outbox.sent_packets
        if self.sock is None:
            await self.stream.send_all(outbox.take(CHUNK if max_packets < 0 else 0))
        else:
            fd = self.sock.fileno()
            send = getattr(outbox, "send", None)
            if send is not None:
                send(fd, max_packets)
            else:
                try:
                    outbox.advance(os.writev(fd, outbox.views(max_packets)))
                except BlockingIOError:
                    pass
        n = outbox.sent_bytes - before
        self.status.sent_bytes += n
        if not (self.rate or self.link):
            self.sent += n
        if not self.hold:
            self.progress.count += outbox.sent_packets - packets
        if self.room and outbox.queued_bytes <= self.limit:
            self.room.unpark_all()
        # Something is left that the socket would not take: wait until it takes more.
        stuck = max_packets < 0 or outbox.sent_packets == packets
        if self.sock is not None and outbox.queued_packets and stuck:
            await trio.lowlevel.wait_writable(self.sock)
