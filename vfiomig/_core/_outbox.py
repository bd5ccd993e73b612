"""The sender's side of the wire: packet headers, each channel's queue of packets, pooled buffers.

The mirror of the receive path's blocks and runs. A device's `PacketHeaders` builds the
multifd + VFIO header of each of its packets (`put` one, `spread` a buffer's worth over
the channels); each channel's `Outbox` holds its packets as (header, data) pairs, the data
never copied, and hands the channel task iovecs for one ``writev`` of many packets
(`views`, then `advance` by what was written). A `SendBuffer` is a buffer a source reads
into, pooled by the sender: it is `busy` while a queued packet still refers to it.

The C core's `Outbox` also has ``send(fd, max_packets)``: the same views written with
``sendmsg`` from C, looping until the socket would block, without a Python object per
packet. Sans-IO here: the caller writes.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

from vfiomig._core._wire import (
    DEVICE_HEADER_SIZE,
    IDSTR_SIZE,
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    VFIO_HEADER_SIZE,
    VFIO_PACKET_VERSION,
    Endian,
    vfio_header_struct,
)

#: Header bytes before each packet's data: the multifd device-state header and the VFIO one.
PACKET_HEADER_SIZE = DEVICE_HEADER_SIZE + VFIO_HEADER_SIZE
#: The most iovecs `Outbox.views` returns (Linux's IOV_MAX).
IOV_MAX = 1024

_COMMON = struct.Struct(">III")
_DEVICE_TAIL = struct.Struct(">II")

Data = bytes | bytearray | memoryview


class SendBuffer(bytearray):
    """A buffer of ``size`` bytes a source reads into; `busy` while queued packets use it."""

    __slots__ = ("pins",)

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("negative size")
        super().__init__(size)
        self.pins = 0

    @property
    def busy(self) -> bool:
        return self.pins > 0

    def __repr__(self) -> str:
        return f"SendBuffer({len(self)})"


class _Packet:
    __slots__ = ("data", "header", "owner")

    def __init__(self, header: bytes, data: memoryview, owner: SendBuffer | None) -> None:
        self.header = header
        self.data = data
        self.owner = owner


class Outbox:
    """One channel's packets not yet written, in the order they were put."""

    def __init__(self) -> None:
        self._packets: deque[_Packet] = deque()
        self._done = 0  # bytes of the head packet already written
        self.queued_bytes = 0
        self.sent_packets = 0
        self.sent_bytes = 0

    @property
    def queued_packets(self) -> int:
        return len(self._packets)

    @property
    def head_size(self) -> int:
        """Wire bytes of the head packet not yet written (0: empty)."""
        if not self._packets:
            return 0
        p = self._packets[0]
        return len(p.header) + len(p.data) - self._done

    def fits(self, max_bytes: int) -> tuple[int, int]:
        """The whole packets from the head within ``max_bytes`` wire bytes (the head's
        part already written not counted): their count and their bytes."""
        total = n = 0
        skip = self._done
        for p in self._packets:
            size = len(p.header) + len(p.data) - skip
            if total + size > max_bytes:
                break
            total += size
            n += 1
            skip = 0
        return n, total

    def _put(self, header: bytes, data: memoryview, owner: SendBuffer | None) -> None:
        if owner is not None:
            owner.pins += 1
        self._packets.append(_Packet(header, data, owner))
        self.queued_bytes += len(header) + len(data)

    def views(self, max_packets: int = -1) -> list[memoryview]:
        """The unwritten bytes of the first ``max_packets`` packets (-1: all), as at most
        `IOV_MAX` buffers for one ``writev``; empty headers or data are left out."""
        out: list[memoryview] = []
        skip = self._done
        for i, p in enumerate(self._packets):
            if i == max_packets or len(out) >= IOV_MAX - 1:
                break
            for part in (memoryview(p.header), p.data):
                n = len(part)
                if skip >= n:
                    skip -= n
                    continue
                out.append(part[skip:] if skip else part)
                skip = 0
        return out

    def advance(self, n: int) -> int:
        """``n`` bytes of `views` were written: drop the packets they complete, release
        their buffers; the number of packets completed."""
        if n < 0 or n > self.queued_bytes:
            raise ValueError(f"advance {n} is out of range (queued {self.queued_bytes})")
        self.queued_bytes -= n
        self.sent_bytes += n
        done = self._done + n
        completed = 0
        packets = self._packets
        while packets:
            p = packets[0]
            size = len(p.header) + len(p.data)
            if done < size:
                break
            done -= size
            packets.popleft()
            if p.owner is not None:
                p.owner.pins -= 1
            completed += 1
        self._done = done
        self.sent_packets += completed
        return completed

    def take(self, max_bytes: int) -> bytes:
        """Whole packets from the head (at least one, then more while under ``max_bytes``),
        as one bytes object, for a stream that is not a socket (TLS); released at once."""
        out: list[memoryview] = []
        total = 0
        while self._packets and (not out or total < max_bytes):
            views = self.views(1)
            total += sum(map(len, views))
            out += [bytes(v) for v in views]  # type: ignore[misc]
            self.advance(sum(map(len, views)))
        return b"".join(out)

    def clear(self) -> None:
        """Drop every packet not yet written (the channel is closing)."""
        for p in self._packets:
            if p.owner is not None:
                p.owner.pins -= 1
        self._packets.clear()
        self.queued_bytes = 0
        self._done = 0


class PacketHeaders:
    """One device's packets: the multifd device-state header and the VFIO packet header
    (``endian``) before each one's data, put into channels' `Outbox` es."""

    def __init__(self, idstr: str, instance: int, endian: Endian = "be") -> None:
        raw = idstr.encode()
        if len(raw) >= IDSTR_SIZE:
            raise ValueError(f"idstr {idstr!r} is {len(raw)} bytes (max {IDSTR_SIZE - 1})")
        if not 0 <= instance <= 0xFFFFFFFF:
            raise ValueError(f"instance {instance} is out of range")
        self._prefix = _COMMON.pack(
            MULTIFD_MAGIC, MULTIFD_VERSION, MULTIFD_FLAG_DEVICE_STATE
        ) + raw.ljust(IDSTR_SIZE, b"\0")
        self._instance = instance
        self._vfio = vfio_header_struct(endian)

    def header(self, idx: int, flags: int, size: int) -> bytes:
        """The header of a packet of ``size`` data bytes."""
        return (
            self._prefix
            + _DEVICE_TAIL.pack(self._instance, VFIO_HEADER_SIZE + size)
            + self._vfio.pack(VFIO_PACKET_VERSION, idx, flags)
        )

    def put(self, outbox: Outbox, data: Data, idx: int, flags: int = 0) -> int:
        """Queue one packet of ``data`` (kept, not copied) on ``outbox``; its wire bytes."""
        view = memoryview(data).cast("B")
        if len(view) > 0xFFFFFFFF - 12:
            raise ValueError(f"packet of {len(view)} bytes is too large")
        outbox._put(self.header(idx, flags, len(view)), view, None)
        return PACKET_HEADER_SIZE + len(view)

    def spread(
        self,
        buf: SendBuffer,
        length: int,
        packet_size: int,
        idx: int,
        outboxes: Sequence[Outbox],
        choices: bytes,
    ) -> int:
        """Cut ``buf[:length]`` into packets of ``packet_size`` data bytes (the last one
        shorter), numbered from ``idx``; packet i goes to ``outboxes[choices[i]]``. The
        number of packets."""
        if packet_size < 1 or not 0 <= length <= len(buf):
            raise ValueError(f"spread of {length} bytes in packets of {packet_size} is invalid")
        count = -(-length // packet_size)
        if len(choices) < count:
            raise ValueError(f"spread needs {count} choices, got {len(choices)}")
        for c in choices[:count]:
            if c >= len(outboxes):
                raise ValueError(f"choice {c} is out of range ({len(outboxes)} outboxes)")
        view = memoryview(buf)
        for i in range(count):
            off = i * packet_size
            data = view[off : min(off + packet_size, length)]
            outboxes[choices[i]]._put(self.header(idx + i, 0, len(data)), data, buf)
        return count
