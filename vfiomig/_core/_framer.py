"""The channel framer: a sans-IO state machine that turns a data channel's byte stream
into a handshake and device-state packets, skipping RAM packets.

Bytes go in through `Framer.feed` (any slicing: one byte at a time or megabytes gives
the same events) or, without a copy, through `Framer.get_buffer`/`Framer.commit` after a
``recv_into``. Events come out of `Framer.next_event`, the only place that raises peer
errors; after an error the framer is poisoned and raises it again.

A packet comes out in two steps so that the caller can apply backpressure between them:
`PacketHeader` (device, VFIO version/idx/flags, data size), then the data, which the
caller pulls with `Framer.read_payload_into` (or `Framer.take_payload` when it is already
buffered) once it has decided where the bytes go. Large data can also bypass the framer's
buffer: when `Framer.buffered` is 0 the caller may receive straight into its own buffer
and report it with `Framer.consume_external`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from vfiomig._core._errors import PacketError, StreamIncompleteError, VfioMigError
from vfiomig._core._wire import (
    DEFAULT_PACKET_CAP,
    DEVICE_HEADER_SIZE,
    HANDSHAKE_SIZE,
    IDSTR_SIZE,
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    RAM_HEADER_BASE,
    RAM_SIZE_OFFSET,
    VFIO_HEADER_SIZE,
    Endian,
    decode_handshake,
    device_name,
    vfio_header_struct,
)

if TYPE_CHECKING:
    from vfiomig._core._reorder import ReorderBuffer


@dataclass(frozen=True, slots=True)
class ChannelHello:
    """The handshake was accepted; ``channel_id`` is the sender's channel number."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """A device-state packet begins; ``size`` data bytes follow (VFIO header excluded)."""

    idstr: str
    instance: int
    version: int
    idx: int
    flags: int
    size: int


@dataclass(frozen=True, slots=True)
class RamSkipped:
    """A RAM or SYNC packet of ``size`` payload bytes was skipped."""

    flags: int
    size: int


@dataclass(frozen=True, slots=True)
class ChannelEnd:
    """The channel ended cleanly, between two packets."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: `Framer.next_event` returns this when it needs more bytes (or `Framer.feed` of b"").
NEED_DATA: Final = _NeedData()

Event = ChannelHello | PacketHeader | RamSkipped | ChannelEnd

#: `Framer.pump` statuses: receive more bytes; the channel ended cleanly; a packet header
#: the caller must take (unknown or unrouted device, or an offer refused for budget); a
#: packet whose offer was accepted and whose data the caller must read and deliver.
PUMP_NEED_DATA: Final = 0
PUMP_END: Final = 1
PUMP_HEADER: Final = 2
PUMP_ACCEPTED: Final = 3
#: `Framer.pump_recv` only: ``recv_into`` has nothing more now; wait until it has.
PUMP_WOULD_BLOCK: Final = 4

#: Bytes `Framer.pump_recv` asks ``recv_into`` for at a time into the framer's buffer (at
#: most the buffer's size); when they do not fit after the unparsed bytes, those move to the
#: front (the C core: to a new block, if packets of the old one are still held).
RECV_CHUNK: Final = 1024 * 1024
#: The data of a packet this large (or a quarter of the framer's buffer) goes straight into
#: its own buffer in `Framer.pump_recv` (and only the next header is received after it, so
#: that the next packet's data does so too); smaller packets are received into the
#: framer's buffer with the packets around them.
BIG_PAYLOAD: Final = 256 * 1024
#: The framer's buffer (the C core's receive block).
BUFFER_SIZE: Final = 2 * 1024 * 1024

_COMMON = struct.Struct(">III")
_DEVICE_TAIL = struct.Struct(">II")
_U32 = struct.Struct(">I")

# States.
_HANDSHAKE, _HEADER, _PAYLOAD, _SKIP, _ENDED = range(5)


def new_payload_buffer(size: int) -> bytearray:
    """A buffer for one packet's data that the caller will fill entirely.

    The C core returns it without zero-filling it: at 1 MiB packets the fill and its page
    faults were a third of the receive path's time (benchmarks/README.md).
    """
    if size < 0:
        raise ValueError("negative size")
    return bytearray(size)


class Framer:
    """Frames one data channel. See the module docstring for the protocol.

    Args:
        uuid: the session uuid (16 bytes); a channel with another uuid is refused.
        channels: the number of channels; the channel id must be below it.
        packet_cap: the largest ``next_packet_size`` accepted.
        ram_page_count: the RAM packets' page count; ``None`` makes a RAM packet an error.
        endian: byte order of the VFIO device-state packet header.
        label: how messages name this channel before the handshake (e.g. its peer address).
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
        self._uuid = uuid
        self._channels = channels
        self._cap = packet_cap
        self._ram_pages = ram_page_count
        self._vfio = vfio_header_struct(endian)
        self.label = label
        self.channel_id: int | None = None
        self._buf = bytearray(buffer_size)
        self._big = min(BIG_PAYLOAD, buffer_size // 4)
        self._recv_chunk = min(RECV_CHUNK, buffer_size)
        self._pos = 0  # first unconsumed byte
        self._end = 0  # end of received bytes
        self._eof = False
        self._state = _HANDSHAKE
        self._remaining = 0  # data bytes left in the current packet (payload or skip)
        self._current: PacketHeader | None = None
        self._error: VfioMigError | None = None
        # pump_recv(): the accepted packet whose data is being received into its own buffer.
        self._pending: bytearray | None = None
        self._pending_got = 0
        self._pending_buf: ReorderBuffer | None = None
        # ... or into the framer's buffer, for the packet `current` and this reorder buffer.
        self._pending_in_buffer: ReorderBuffer | None = None
        self._last_big = False

    # -- ingress -------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; an empty ``data`` means the peer closed the channel."""
        n = len(data)
        if not n:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("feed() after end of stream")
        self._make_room(n)
        self._buf[self._end : self._end + n] = data
        self._end += n

    def get_buffer(self, size: int) -> memoryview:
        """Return a writable view of ``size`` bytes to ``recv_into``, then call `commit`.

        Release the view (let it go out of scope) before calling another method.
        """
        self._make_room(size)
        return memoryview(self._buf)[self._end : self._end + size]

    def commit(self, n: int) -> None:
        """Keep ``n`` bytes received into the view from `get_buffer`; 0 means end of stream."""
        if n == 0:
            self._eof = True
        self._end += n

    def _make_room(self, n: int) -> None:
        # The buffer only grows when a single receive asks for more than it holds; in the
        # steady state bytes are moved to the front and the capacity stays put.
        if self._end + n <= len(self._buf):
            return
        live = self._end - self._pos
        if self._pos:
            self._buf[:live] = self._buf[self._pos : self._end]
            self._pos, self._end = 0, live
        if live + n > len(self._buf):
            self._buf.extend(bytes(live + n - len(self._buf)))

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return self._end - self._pos

    @property
    def payload_remaining(self) -> int:
        """Data bytes of the current packet not yet read (0 between packets)."""
        return self._remaining if self._state == _PAYLOAD else 0

    @property
    def current(self) -> PacketHeader | None:
        """The packet whose data is being read, if any."""
        return self._current if self._state == _PAYLOAD else None

    # -- events --------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        """Return the next event, or `NEED_DATA`.

        Raises:
            PacketError: malformed input (bad magic, version, flags, idstr, size).
            HandshakeError: the handshake is refused.
            StreamIncompleteError: the stream ended inside a packet.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except VfioMigError as exc:
            self._error = exc
            raise

    def _fail_eof(self, what: str) -> StreamIncompleteError:
        return StreamIncompleteError(f"{self._name()}: channel ended inside {what}")

    def _name(self) -> str:
        return f"channel {self.channel_id}" if self.channel_id is not None else self.label

    def _next_event(self) -> Event | _NeedData:
        while True:
            state = self._state
            avail = self._end - self._pos
            if state == _HEADER:
                if avail < 12:
                    if self._eof:
                        if avail:
                            raise self._fail_eof(f"a packet header ({avail} of 12 bytes)")
                        self._state = _ENDED
                        return ChannelEnd()
                    return NEED_DATA
                magic, version, flags = _COMMON.unpack_from(self._buf, self._pos)
                if magic != MULTIFD_MAGIC:
                    raise PacketError(
                        f"{self._name()}: packet magic {magic:#x} (expected {MULTIFD_MAGIC:#x})"
                    )
                if version != MULTIFD_VERSION:
                    raise PacketError(
                        f"{self._name()}: packet version {version} (expected {MULTIFD_VERSION})"
                    )
                event: Event | _NeedData | None
                if flags & MULTIFD_FLAG_DEVICE_STATE:
                    event = self._device_header(avail)
                else:
                    event = self._ram_header(avail, flags)
                if event is NEED_DATA and self._eof:
                    raise self._fail_eof(f"a packet header ({avail} bytes)")
                if event is not None:
                    return event
            elif state == _PAYLOAD:
                raise RuntimeError("the current packet's data must be read before the next event")
            elif state == _SKIP:
                take = min(avail, self._remaining)
                self._pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HEADER
                    continue
                if self._eof:
                    raise self._fail_eof(f"a ram packet ({self._remaining} bytes missing)")
                return NEED_DATA
            elif state == _HANDSHAKE:
                if avail < HANDSHAKE_SIZE:
                    if self._eof:
                        raise self._fail_eof(f"its handshake ({avail} of {HANDSHAKE_SIZE} bytes)")
                    return NEED_DATA
                view = memoryview(self._buf)[self._pos : self._pos + HANDSHAKE_SIZE]
                try:
                    cid = decode_handshake(view, uuid=self._uuid, channels=self._channels)
                finally:
                    view.release()
                self._pos += HANDSHAKE_SIZE
                self._state = _HEADER
                self.channel_id = cid
                return ChannelHello(cid)
            else:
                return ChannelEnd()

    def _device_header(self, avail: int) -> PacketHeader | _NeedData:
        pos = self._pos
        if avail < DEVICE_HEADER_SIZE:
            return NEED_DATA
        instance, size = _DEVICE_TAIL.unpack_from(self._buf, pos + 268)
        raw = bytes(self._buf[pos + 12 : pos + 12 + IDSTR_SIZE])
        if raw[-1] != 0:
            raise PacketError(f"{self._name()}: packet idstr is not nul-terminated")
        idstr = raw[: raw.index(0)].decode("utf-8", "backslashreplace")
        name = device_name(idstr, instance)
        if size > self._cap:
            raise PacketError(f"{name}: packet size {size} is above the cap ({self._cap})")
        if size < VFIO_HEADER_SIZE:
            raise PacketError(f"{name}: packet too short at {size} (min is {VFIO_HEADER_SIZE})")
        if avail < DEVICE_HEADER_SIZE + VFIO_HEADER_SIZE:
            return NEED_DATA
        version, idx, flags = self._vfio.unpack_from(self._buf, pos + DEVICE_HEADER_SIZE)
        self._pos = pos + DEVICE_HEADER_SIZE + VFIO_HEADER_SIZE
        header = PacketHeader(idstr, instance, version, idx, flags, size - VFIO_HEADER_SIZE)
        self._current = header
        self._remaining = header.size
        self._state = _PAYLOAD
        if header.size == 0:
            self._state = _HEADER
        return header

    def _ram_header(self, avail: int, flags: int) -> RamSkipped | _NeedData | None:
        if self._ram_pages is None:
            raise PacketError(
                f"{self._name()}: ram packet with flags {flags:#x} on a device-state channel"
                " (pass --ram-page-count to skip ram packets)"
            )
        hlen = RAM_HEADER_BASE + 8 * self._ram_pages
        if avail < hlen:
            return NEED_DATA
        (size,) = _U32.unpack_from(self._buf, self._pos + RAM_SIZE_OFFSET)
        if size > self._cap:
            raise PacketError(
                f"{self._name()}: ram packet size {size} is above the cap ({self._cap})"
            )
        self._pos += hlen
        self._remaining = size
        self._state = _SKIP
        return RamSkipped(flags, size)

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
        if self._state == _HANDSHAKE and self._error is None:
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
                if self._last_big and self._state == _HEADER and have < head:
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
        assert self._state == _PAYLOAD and cur is not None, "no packet data to defer"
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

    # -- packet data ---------------------------------------------------------------

    def read_payload_into(self, out: memoryview) -> int:
        """Copy buffered data of the current packet into ``out``; return the byte count.

        Raises:
            StreamIncompleteError: the stream ended before the packet's data did.
        """
        if self._error is not None:
            raise self._error
        assert self._state == _PAYLOAD, "no packet data to read"
        n = min(len(out), self._remaining, self._end - self._pos)
        if n == 0 and self._eof and len(out):
            self._error = self._truncated()
            raise self._error
        out[:n] = memoryview(self._buf)[self._pos : self._pos + n]
        self._advance(n)
        return n

    def take_payload(self) -> bytes | None:
        """Return the current packet's whole data if it is all buffered, else ``None``."""
        assert self._state == _PAYLOAD, "no packet data to read"
        n = self._remaining
        if self._end - self._pos < n:
            return None
        data = bytes(self._buf[self._pos : self._pos + n])
        self._advance(n)
        return data

    def consume_external(self, n: int) -> None:
        """Account for ``n`` data bytes the caller received without the framer."""
        assert self._state == _PAYLOAD and self._pos == self._end, "framer holds bytes"
        assert 0 < n <= self._remaining, "more data than the packet has"
        self._remaining -= n
        if self._remaining == 0:
            self._state = _HEADER

    def fail_truncated(self) -> StreamIncompleteError:
        """Poison the framer because the peer closed mid-packet; return the error to raise."""
        self._error = self._truncated()
        return self._error

    def _truncated(self) -> StreamIncompleteError:
        cur = self._current
        assert cur is not None
        # Data received counts whether read or still buffered (`pump_recv` keeps a packet
        # smaller than a quarter of its buffer in it until it is whole).
        got = cur.size - self._remaining + min(self._end - self._pos, self._remaining)
        name = device_name(cur.idstr, cur.instance)
        return StreamIncompleteError(
            f"{name}: channel ended inside packet idx {cur.idx} ({got} of {cur.size} bytes)",
            device=name,
            idx=cur.idx,
        )

    def _advance(self, n: int) -> None:
        self._pos += n
        self._remaining -= n
        if self._remaining == 0:
            self._state = _HEADER
