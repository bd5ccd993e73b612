"""The channel parser: a sans-IO state machine that turns a data channel's byte stream
into a handshake and device-state packets, skipping RAM packets.

Bytes go in through `ChannelParser.feed` (any slicing: one byte at a time or megabytes
gives the same events) or, without a copy, through `ChannelParser.get_buffer` and
`ChannelParser.commit` after a ``recv_into``. Events come out of
`ChannelParser.next_event`, the only place that raises peer errors; after an error the
parser is poisoned and raises it again.

A packet comes out in two steps so that the caller can apply backpressure between them:
`PacketHeader` (device, VFIO version/idx/flags, data size), then the data, which the
caller pulls with `ChannelParser.read_payload_into` (or `ChannelParser.take_payload` when
it is already buffered) once it has decided where the bytes go. Large data can also
bypass the parser's buffer: when `ChannelParser.buffered` is 0 the caller may receive
straight into its own buffer and report it with `ChannelParser.consume_external`.

`vfiomig._core._framer.Framer` is this parser with the receive path's pump on top; the
C core's Framer is both in one type.
"""

from __future__ import annotations

import struct

from vfiomig._core._errors import PacketError, StreamIncompleteError, VfioMigError
from vfiomig._core._events import (
    BUFFER_SIZE,
    NEED_DATA,
    ChannelEnd,
    ChannelHello,
    Event,
    PacketHeader,
    RamSkipped,
    _NeedData,
)
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

_COMMON = struct.Struct(">III")
_DEVICE_TAIL = struct.Struct(">II")
_U32 = struct.Struct(">I")

# States (the pump in _framer reads them too).
HANDSHAKE, HEADER, PAYLOAD, SKIP, ENDED = range(5)


class ChannelParser:
    """Parses one data channel. See the module docstring for the protocol.

    Args:
        uuid: the session uuid (16 bytes); a channel with another uuid is refused.
        channels: the number of channels; the channel id must be below it.
        packet_cap: the largest ``next_packet_size`` accepted.
        ram_page_count: the RAM packets' page count; ``None`` makes a RAM packet an error.
        endian: byte order of the VFIO device-state packet header.
        label: how messages name this channel before the handshake (e.g. its peer address).
        buffer_size: the initial size of the buffer received bytes wait in.
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
        self._pos = 0  # first unconsumed byte
        self._end = 0  # end of received bytes
        self._eof = False
        self._state = HANDSHAKE
        self._remaining = 0  # data bytes left in the current packet (payload or skip)
        self._current: PacketHeader | None = None
        self._error: VfioMigError | None = None

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
        return self._remaining if self._state == PAYLOAD else 0

    @property
    def current(self) -> PacketHeader | None:
        """The packet whose data is being read, if any."""
        return self._current if self._state == PAYLOAD else None

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
            if state == HEADER:
                if avail < 12:
                    if self._eof:
                        if avail:
                            raise self._fail_eof(f"a packet header ({avail} of 12 bytes)")
                        self._state = ENDED
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
            elif state == PAYLOAD:
                raise RuntimeError("the current packet's data must be read before the next event")
            elif state == SKIP:
                take = min(avail, self._remaining)
                self._pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = HEADER
                    continue
                if self._eof:
                    raise self._fail_eof(f"a ram packet ({self._remaining} bytes missing)")
                return NEED_DATA
            elif state == HANDSHAKE:
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
                self._state = HEADER
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
        self._state = PAYLOAD
        if header.size == 0:
            self._state = HEADER
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
        self._state = SKIP
        return RamSkipped(flags, size)

    # -- packet data ---------------------------------------------------------------

    def read_payload_into(self, out: memoryview) -> int:
        """Copy buffered data of the current packet into ``out``; return the byte count.

        Raises:
            StreamIncompleteError: the stream ended before the packet's data did.
        """
        if self._error is not None:
            raise self._error
        assert self._state == PAYLOAD, "no packet data to read"
        n = min(len(out), self._remaining, self._end - self._pos)
        if n == 0 and self._eof and len(out):
            self._error = self._truncated()
            raise self._error
        out[:n] = memoryview(self._buf)[self._pos : self._pos + n]
        self._advance(n)
        return n

    def take_payload(self) -> bytes | None:
        """Return the current packet's whole data if it is all buffered, else ``None``."""
        assert self._state == PAYLOAD, "no packet data to read"
        n = self._remaining
        if self._end - self._pos < n:
            return None
        data = bytes(self._buf[self._pos : self._pos + n])
        self._advance(n)
        return data

    def consume_external(self, n: int) -> None:
        """Account for ``n`` data bytes the caller received without the framer."""
        assert self._state == PAYLOAD and self._pos == self._end, "framer holds bytes"
        assert 0 < n <= self._remaining, "more data than the packet has"
        self._remaining -= n
        if self._remaining == 0:
            self._state = HEADER

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
            self._state = HEADER
