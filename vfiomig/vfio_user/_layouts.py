"""Byte layouts of the vfio-user device commands (spec v0.9.2 and libvfio-user), sans-IO:
device and region info, region access (REGION_READ / REGION_WRITE), IRQs, DMA and the
DMA-logging features.

Every reader takes a payload ``memoryview`` and raises `ProtocolError` when it is too
short; values are returned unchecked (the server checks them against the device before
any use). The region access bodies have one class per direction, because the same
command carries different fields each way (REGION_READ asks for ``count`` bytes and gets
them back). Everything is host byte order and packed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vfiomig.vfio_user._header import HEADER_SIZE, ProtocolError, short

# DEVICE_GET_INFO
DEVICE_INFO: Final = struct.Struct("=IIII")  # argsz, flags, num_regions, num_irqs
DEVICE_FLAGS_RESET: Final = 1 << 0
DEVICE_FLAGS_PCI: Final = 1 << 1

# DEVICE_GET_REGION_INFO and its sparse-mmap capability
REGION_INFO: Final = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
REGION_INFO_SIZE: Final = REGION_INFO.size
REGION_FLAG_READ: Final = 1 << 0
REGION_FLAG_WRITE: Final = 1 << 1
REGION_FLAG_MMAP: Final = 1 << 2
REGION_FLAG_CAPS: Final = 1 << 3
CAP_SPARSE_MMAP: Final = 1
SPARSE_HEAD: Final = struct.Struct("=HHIII")  # id, version, next, nr_areas, reserved
SPARSE_AREA: Final = struct.Struct("=QQ")  # offset, size

# DEVICE_GET_REGION_IO_FDS: request and reply head (argsz, flags, index, count)
IO_FDS: Final = struct.Struct("=IIII")
#: vfio_user_sub_region_ioeventfd: offset, size, fd_index, type, flags, shadow fd index,
#: shadow offset, datamatch.
SUB_REGION_IOEVENTFD: Final = struct.Struct("=QQIIIIQQ")
#: VFIO_USER_IO_FD_TYPE_IOEVENTFD and the datamatch flag of a sub-region.
IO_FD_TYPE_IOEVENTFD: Final = 0
IO_FD_FLAG_DATAMATCH: Final = 1

# REGION_WRITE_MULTI: the count, then each write (QEMU's VFIOUserWROne): offset, region,
# count and up to 8 data bytes.
MULTI_COUNT: Final = struct.Struct("=Q")
MULTI_ONE: Final = struct.Struct("=QII8s")
#: The most writes in one REGION_WRITE_MULTI (QEMU's VFIO_USER_MULTI_MAX).
MULTI_MAX: Final = 200

# DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS
IRQ_INFO: Final = struct.Struct("=IIII")  # argsz, flags, index, count
IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_INFO_MASKABLE: Final = 1 << 1
IRQ_INFO_AUTOMASKED: Final = 1 << 2
IRQ_INFO_NORESIZE: Final = 1 << 3
IRQ_SET: Final = struct.Struct("=IIIII")  # argsz, flags, index, start, count
IRQ_SET_DATA_NONE: Final = 1 << 0
IRQ_SET_DATA_BOOL: Final = 1 << 1
IRQ_SET_DATA_EVENTFD: Final = 1 << 2
IRQ_SET_DATA_MASK: Final = 0x7
IRQ_SET_ACTION_MASK: Final = 1 << 3
IRQ_SET_ACTION_UNMASK: Final = 1 << 4
IRQ_SET_ACTION_TRIGGER: Final = 1 << 5
IRQ_SET_ACTION_TYPE_MASK: Final = 0x38

# DMA_MAP / DMA_UNMAP / DMA_READ / DMA_WRITE
DMA_MAP: Final = struct.Struct("=IIQQQ")  # argsz, flags, offset, addr, size
DMA_FLAG_READ: Final = 1 << 0
DMA_FLAG_WRITE: Final = 1 << 1
DMA_UNMAP: Final = struct.Struct("=IIQQ")  # argsz, flags, addr, size
UNMAP_FLAG_GET_DIRTY_BITMAP: Final = 1 << 0
UNMAP_FLAG_ALL: Final = 1 << 1
BITMAP: Final = struct.Struct("=QQ")  # pgsize, size
DMA_ACCESS: Final = struct.Struct("=QQ")  # addr, count

# DEVICE_FEATURE: DMA logging
FEATURE_DMA_LOGGING_START: Final = 6
FEATURE_DMA_LOGGING_STOP: Final = 7
FEATURE_DMA_LOGGING_REPORT: Final = 8
LOGGING_CONTROL: Final = struct.Struct("=QII")  # page_size, num_ranges, reserved
LOGGING_RANGE: Final = struct.Struct("=QQ")  # iova, length
LOGGING_REPORT: Final = struct.Struct("=QQQ")  # iova, length, page_size


def unpack(layout: struct.Struct, payload: memoryview, what: str) -> tuple[int, ...]:
    """The fields of ``layout`` at the start of ``payload``; `ProtocolError` if too short."""
    if len(payload) < layout.size:
        raise ProtocolError(
            f"{what} payload of {len(payload)} bytes is too short (min {layout.size})"
        )
    return layout.unpack_from(payload)


@dataclass(frozen=True, slots=True)
class IrqSet:
    """A DEVICE_SET_IRQS request head; ``data`` is what follows it (bools, if any)."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: memoryview

    @property
    def action(self) -> int:
        return self.flags & IRQ_SET_ACTION_TYPE_MASK

    @property
    def data_type(self) -> int:
        return self.flags & IRQ_SET_DATA_MASK

    @classmethod
    def unpack(cls, payload: memoryview) -> IrqSet:
        argsz, flags, index, start, count = unpack(IRQ_SET, payload, "set irqs")
        return cls(argsz, flags, index, start, count, payload[IRQ_SET.size :])


@dataclass(frozen=True, slots=True)
class DmaMap:
    """A DMA_MAP request."""

    argsz: int
    flags: int
    offset: int
    addr: int
    size: int

    @classmethod
    def unpack(cls, payload: memoryview) -> DmaMap:
        return cls(*unpack(DMA_MAP, payload, "dma map"))


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    """A DMA_UNMAP request; ``bitmap`` is ``(pgsize, size)`` with GET_DIRTY_BITMAP."""

    argsz: int
    flags: int
    addr: int
    size: int
    bitmap: tuple[int, int] | None

    @classmethod
    def unpack(cls, payload: memoryview) -> DmaUnmap:
        argsz, flags, addr, size = unpack(DMA_UNMAP, payload, "dma unmap")
        bitmap = None
        if flags & UNMAP_FLAG_GET_DIRTY_BITMAP:
            pgsize, bsize = unpack(BITMAP, payload[DMA_UNMAP.size :], "dma unmap bitmap")
            bitmap = (pgsize, bsize)
        return cls(argsz, flags, addr, size, bitmap)


def region_info(
    *, argsz: int, flags: int, index: int, cap_offset: int, size: int, offset: int
) -> bytes:
    return REGION_INFO.pack(argsz, flags, index, cap_offset, size, offset)


def sparse_mmap_cap(areas: list[tuple[int, int]]) -> bytes:
    """The sparse-mmap capability (``next`` 0) with ``(offset, size)`` areas."""
    head = SPARSE_HEAD.pack(CAP_SPARSE_MMAP, 1, 0, len(areas), 0)
    return head + b"".join(SPARSE_AREA.pack(off, size) for off, size in areas)


def sparse_mmap_cap_size(nr_areas: int) -> int:
    return SPARSE_HEAD.size + SPARSE_AREA.size * nr_areas


def bitmap_size(length: int, pgsize: int) -> int:
    """Bytes of a dirty bitmap with one bit per ``pgsize`` page of ``length`` bytes, in
    whole u64 words (libvfio-user's ``get_bitmap_size``)."""
    pages = (length + pgsize - 1) // pgsize
    return (pages + 63) // 64 * 8


# --------------------------------------------------------------------------- region access

_REGION_ACCESS = struct.Struct("=QII")  # offset, region, count
REGION_ACCESS_HEADER_SIZE: Final = _REGION_ACCESS.size
#: Bytes a message adds around ``max_data_xfer_size`` bytes of data, at most.
MESSAGE_OVERHEAD: Final = HEADER_SIZE + REGION_ACCESS_HEADER_SIZE


def _region_access(payload: memoryview, what: str) -> tuple[int, int, int]:
    """The ``u64 offset, u32 region, u32 count`` that starts every region access message."""
    if len(payload) < REGION_ACCESS_HEADER_SIZE:
        raise short(what, len(payload), REGION_ACCESS_HEADER_SIZE)
    offset, region, count = _REGION_ACCESS.unpack_from(payload)
    return offset, region, count


@dataclass(frozen=True, slots=True)
class RegionRead:
    """REGION_READ request: ``u64 offset, u32 region, u32 count``."""

    region: int
    offset: int
    count: int

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionRead:
        offset, region, count = _region_access(payload, "region read")
        return cls(region, offset, count)


@dataclass(frozen=True, slots=True)
class RegionReadReply:
    """REGION_READ reply: the request's fields, then ``count`` bytes."""

    region: int
    offset: int
    count: int
    data: bytes

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionReadReply:
        offset, region, count = _region_access(payload, "region read reply")
        room = len(payload) - REGION_ACCESS_HEADER_SIZE
        if count > room:
            raise ProtocolError(f"region read reply count {count} exceeds its {room} data bytes")
        start = REGION_ACCESS_HEADER_SIZE
        return cls(region, offset, count, bytes(payload[start : start + count]))


@dataclass(frozen=True, slots=True)
class RegionWrite:
    """REGION_WRITE request: ``u64 offset, u32 region, u32 count``, then exactly ``count`` bytes."""

    region: int
    offset: int
    data: bytes

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionWrite:
        offset, region, count = _region_access(payload, "region write")
        room = len(payload) - REGION_ACCESS_HEADER_SIZE
        if count != room:
            raise ProtocolError(f"region write count {count} differs from its {room} data bytes")
        return cls(region, offset, bytes(payload[REGION_ACCESS_HEADER_SIZE:]))


@dataclass(frozen=True, slots=True)
class RegionWriteReply:
    """REGION_WRITE reply: ``u64 offset, u32 region, u32 count`` (bytes written)."""

    region: int
    offset: int
    count: int

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionWriteReply:
        offset, region, count = _region_access(payload, "region write reply")
        return cls(region, offset, count)


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """DEVICE_GET_REGION_INFO request and reply: ``struct vfio_region_info`` (32 bytes).

    A request fills ``argsz`` (room for the reply) and ``index``; a reply may append
    capabilities (``caps``: every byte after the 32, unchecked; `sparse_areas` reads them).
    """

    argsz: int
    index: int
    flags: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0
    caps: bytes = b""

    @classmethod
    def request(cls, index: int, argsz: int = REGION_INFO_SIZE) -> RegionInfo:
        return cls(argsz, index)

    def pack(self) -> bytes:
        return REGION_INFO.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionInfo:
        if len(payload) < REGION_INFO_SIZE:
            raise short("region info", len(payload), REGION_INFO_SIZE)
        argsz, flags, index, cap_offset, size, offset = REGION_INFO.unpack_from(payload)
        caps = bytes(payload[REGION_INFO_SIZE:])
        return cls(argsz, index, flags, cap_offset, size, offset, caps)
