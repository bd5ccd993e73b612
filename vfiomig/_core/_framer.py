"""The channel framer: `ChannelParser` with the receive path's pump on top.

`Framer.pump` takes every packet its buffer holds in one call (routes it to its device's
reorder buffer, offers it, delivers its data when whole); `Framer.pump_recv` also receives
for itself, so that a channel's whole data plane is one call per wake-up. The receive
schedule here (sizes, which packets go into the framer's buffer) mirrors the C core's
pump_recv (native/glue_framer_pump.c) for parity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from vfiomig._core._events import (
    BIG_PAYLOAD,
    BUFFER_SIZE,
    NEED_DATA,
    PUMP_ACCEPTED,
    PUMP_END,
    PUMP_HEADER,
    PUMP_NEED_DATA,
    PUMP_WOULD_BLOCK,
    RECV_CHUNK,
    PacketHeader,
    RamSkipped,
    new_payload_buffer,
)
from vfiomig._core._parser import HANDSHAKE, HEADER, PAYLOAD, ChannelParser
from vfiomig._core._wire import DEFAULT_PACKET_CAP, DEVICE_HEADER_SIZE, VFIO_HEADER_SIZE, Endian

if TYPE_CHECKING:
    from vfiomig._core._reorder import ReorderBuffer


class Framer(ChannelParser):
    """Frames one data channel: `ChannelParser` (its arguments) and the pump.

    Args:
        buffer_size: the framer's buffer (the C core's receive block); a packet's data of a
            quarter of it (at most `BIG_PAYLOAD`) goes into a buffer of its own.
    """

    def __init__(
        self,
        *,
        uuid: bytes,
        channels: int,
        packet_cap: int = DEFAULT_PACKET_CAP,
        ram_page_count: int | None = None,
        endian: Endian = "be",
        label: str = "channel",
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        super().__init__(
            uuid=uuid,
            channels=channels,
            packet_cap=packet_cap,
            ram_page_count=ram_page_count,
            endian=endian,
            label=label,
            buffer_size=buffer_size,
        )
        self._big = min(BIG_PAYLOAD, buffer_size // 4)
        self._recv_chunk = min(RECV_CHUNK, buffer_size)
        # pump_recv(): the accepted packet whose data is being received into its own buffer.
        self._pending: bytearray | None = None
        self._pending_got = 0
        self._pending_buf: ReorderBuffer | None = None
        # ... or into the framer's buffer, for the packet `current` and this reorder buffer.
        self._pending_in_buffer: ReorderBuffer | None = None
        self._last_big = False

    def pump(
        self, routes: Mapping[tuple[str, int], ReorderBuffer]
    ) -> tuple[int, int, PacketHeader | None]:
        """Take every packet the buffer holds in one call: route it by ``(idstr, instance)``
        through ``routes``, offer it, and deliver its data when it is all buffered.

        Returns ``(status, done, header)``: ``done`` packets (device-state and RAM) were
        handled completely; ``status`` says why it stopped (`PUMP_NEED_DATA`, `PUMP_END`,
        `PUMP_HEADER` or `PUMP_ACCEPTED` with its ``header``). ``routes`` may only grow.
        Only for a channel past its handshake.

        Raises:
            the errors of `next_event` and of the buffers' ``offer`` and ``deliver``.
        """
        if self._state == HANDSHAKE and self._error is None:
            raise RuntimeError("pump() before the handshake")
        done = 0
        while True:
            ev = self.next_event()
            if ev is NEED_DATA:
                return PUMP_NEED_DATA, done, None
            if type(ev) is PacketHeader:
                buf = routes.get((ev.idstr, ev.instance))
                if buf is None or not buf.offer(ev.version, ev.idx, ev.flags, ev.size):
                    return PUMP_HEADER, done, ev
                data: bytes | None = self.take_payload() if ev.size else b""
                if data is None:
                    return PUMP_ACCEPTED, done, ev
                buf.deliver(ev.idx, data)
                done += 1
            elif type(ev) is RamSkipped:
                done += 1
            else:
                return PUMP_END, done, None

    def pump_recv(
        self,
        recv_into: Callable[[memoryview], int],
        routes: Mapping[tuple[str, int], ReorderBuffer],
        limit: int,
    ) -> tuple[int, int, PacketHeader | None]:
        """`pump` that receives for itself: the whole data plane of a channel in one call.

        ``recv_into(view)`` is a non-blocking receive (a socket's ``recv_into``): it returns
        the byte count, 0 at the end of the stream, or raises `BlockingIOError` when nothing
        is there. Between packets the framer receives up to `RECV_CHUNK` bytes into its own
        buffer; the data of an accepted packet that is not all buffered goes straight into
        that packet's own buffer, across calls, and is delivered once complete.

        Returns like `pump`, with two differences: `PUMP_WOULD_BLOCK` when ``recv_into``
        has nothing more, `PUMP_NEED_DATA` when ``limit`` bytes were received in this call
        (call again after letting others run), and never `PUMP_ACCEPTED`.

        Raises:
            the errors of `pump`; `StreamIncompleteError` if the stream ends inside a
            packet's data; whatever ``recv_into`` raises but `BlockingIOError` (the packet
            being received is then `current`).
        """
        done = received = 0
        while True:
            into = self._pending_in_buffer
            if into is not None:
                cur = self._current
                assert cur is not None
                have = self._end - self._pos
                if have < cur.size:
                    if received >= limit:
                        return PUMP_NEED_DATA, done, None
                    n = self._recv_buffer(recv_into, cur.size - have)
                    if n < 0:
                        return PUMP_WOULD_BLOCK, done, None
                    if n == 0:
                        raise self.fail_truncated()
                    received += n
                    continue
                self._pending_in_buffer = None
                self._last_big = False
                data = self._buf[self._pos : self._pos + cur.size]
                self._advance(cur.size)
                into.deliver(cur.idx, data)
                done += 1
                continue
            payload = self._pending
            if payload is not None:
                got = self._pending_got
                size = len(payload)
                view = memoryview(payload)
                try:
                    if got < size and self._pos < self._end:
                        got += self.read_payload_into(view[got:])
                    while got < size:
                        if received >= limit:
                            return PUMP_NEED_DATA, done, None
                        try:
                            n = recv_into(view[got:])
                        except BlockingIOError:
                            return PUMP_WOULD_BLOCK, done, None
                        if n == 0:
                            self._eof = True
                            raise self.fail_truncated()
                        self.consume_external(n)
                        got += n
                        received += n
                finally:
                    self._pending_got = got
                    view.release()
                buf = self._pending_buf
                assert buf is not None and self._current is not None
                self._pending = self._pending_buf = None
                self._last_big = size >= self._big
                buf.deliver(self._current.idx, payload)
                done += 1
                continue
            status, n, header = self.pump(routes)
            done += n
            if status == PUMP_NEED_DATA:
                if received >= limit:
                    return PUMP_NEED_DATA, done, None
                have = self._end - self._pos
                head = DEVICE_HEADER_SIZE + VFIO_HEADER_SIZE
                if self._last_big and self._state == HEADER and have < head:
                    with self.get_buffer(head - have) as view:
                        try:
                            n = recv_into(view)
                        except BlockingIOError:
                            n = -1
                    if n >= 0:
                        self.commit(n)
                else:
                    n = self._recv_buffer(recv_into, 1)
                if n < 0:
                    return PUMP_WOULD_BLOCK, done, None
                received += n
            elif status == PUMP_ACCEPTED:
                assert header is not None
                self._pend(routes[header.idstr, header.instance], header.size)
            else:
                return status, done, header

    def defer_payload(self, buf: ReorderBuffer) -> None:
        """Leave the data of the packet `pump_recv` just returned with `PUMP_HEADER` (and
        ``buf`` then accepted) to the next `pump_recv` calls: they receive it and deliver
        it to ``buf`` like the packets they accept themselves."""
        cur = self._current
        assert self._pending is None and self._pending_in_buffer is None, "one at a time"
        assert self._state == PAYLOAD and cur is not None, "no packet data to defer"
        assert self._remaining == cur.size, "the packet's data was read in part"
        self._pend(buf, cur.size)

    def _pend(self, buf: ReorderBuffer, size: int) -> None:
        """The current packet's data (``size`` bytes) is `pump_recv`'s to receive and
        deliver to ``buf``: in the buffer if small, else into a buffer of its own."""
        if size < self._big:
            self._pending_in_buffer = buf
        else:
            self._pending = new_payload_buffer(size)
            self._pending_got = 0
            self._pending_buf = buf

    def _recv_buffer(self, recv_into: Callable[[memoryview], int], need: int) -> int:
        """Receive up to `RECV_CHUNK` bytes (or ``need``, if more) into the buffer; -1:
        would block."""
        with self.get_buffer(max(need, self._recv_chunk)) as view:
            try:
                n = recv_into(view)
            except BlockingIOError:
                return -1
        self.commit(n)
        return n
