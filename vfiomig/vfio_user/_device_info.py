"""The replies a VMM reads to learn a device (sans-IO): DEVICE_GET_INFO, the capability
chain of DEVICE_GET_REGION_INFO (sparse mmap areas), DEVICE_GET_IRQ_INFO, and the
``struct vfio_user_dma_region_access`` head of the server's DMA_READ / DMA_WRITE.

Each reader checks every length and offset and raises `ProtocolError` for anything
malformed; the values themselves are the caller's to check against its own state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from vfiomig.vfio_user._header import ProtocolError, short
from vfiomig.vfio_user._layouts import (
    CAP_SPARSE_MMAP,
    DEVICE_INFO,
    DMA_ACCESS,
    IRQ_INFO,
    REGION_INFO_SIZE,
    SPARSE_AREA,
    SPARSE_HEAD,
    RegionInfo,
    unpack,
)

#: The most capabilities a chain may hold before it is taken for a loop.
MAX_CAPS: Final = 64
#: The most sparse mmap areas one region may list.
MAX_AREAS: Final = 1024


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """DEVICE_GET_INFO reply: ``struct vfio_device_info``."""

    argsz: int
    flags: int
    num_regions: int
    num_irqs: int

    @staticmethod
    def request() -> bytes:
        return DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> DeviceInfo:
        return cls(*unpack(DEVICE_INFO, memoryview(payload), "device info"))


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """DEVICE_GET_IRQ_INFO reply: ``struct vfio_irq_info``."""

    argsz: int
    flags: int
    index: int
    count: int

    @staticmethod
    def request(index: int) -> bytes:
        return IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> IrqInfo:
        return cls(*unpack(IRQ_INFO, memoryview(payload), "irq info"))


def sparse_areas(info: RegionInfo) -> list[tuple[int, int]]:
    """The ``(offset, size)`` areas of ``info``'s sparse-mmap capability; ``[]`` without one.

    ``cap_offset`` and every ``next`` count from the start of the reply (``struct
    vfio_region_info``); each header and area must lie inside the reply, a chain may not
    loop, and every area must lie inside the region.
    """
    total = REGION_INFO_SIZE + len(info.caps)
    at = info.cap_offset
    seen = 0
    while at:
        seen += 1
        if seen > MAX_CAPS:
            raise ProtocolError(f"region {info.index} capability chain is longer than {MAX_CAPS}")
        if at < REGION_INFO_SIZE or at + SPARSE_HEAD.size > total:
            raise ProtocolError(
                f"region {info.index} capability at {at} is outside the reply ({total} bytes)"
            )
        view = memoryview(info.caps)[at - REGION_INFO_SIZE :]
        cap_id, _version, nxt, count, _ = SPARSE_HEAD.unpack_from(view)
        if cap_id == CAP_SPARSE_MMAP:
            return _areas(info, view[SPARSE_HEAD.size :], count)
        if nxt and nxt <= at:
            raise ProtocolError(f"region {info.index} capability at {at} points back to {nxt}")
        at = nxt
    return []


def _areas(info: RegionInfo, view: memoryview, count: int) -> list[tuple[int, int]]:
    if count > MAX_AREAS:
        raise ProtocolError(f"region {info.index} sparse mmap areas {count} (max {MAX_AREAS})")
    if len(view) < count * SPARSE_AREA.size:
        raise short(f"region {info.index} sparse mmap", len(view), count * SPARSE_AREA.size)
    areas = [SPARSE_AREA.unpack_from(view, i * SPARSE_AREA.size) for i in range(count)]
    for offset, size in areas:
        if size == 0 or offset + size > info.size:
            raise ProtocolError(
                f"region {info.index} sparse mmap area {offset:#x}+{size:#x} "
                f"is outside the region ({info.size:#x})"
            )
    return [(int(o), int(s)) for o, s in areas]


@dataclass(frozen=True, slots=True)
class DmaAccess:
    """A DMA_READ / DMA_WRITE request from the server: ``u64 addr, u64 count``, then (a
    DMA_WRITE) the data."""

    addr: int
    count: int
    data: memoryview

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> DmaAccess:
        view = memoryview(payload)
        addr, count = unpack(DMA_ACCESS, view, "dma access")
        return cls(addr, count, view[DMA_ACCESS.size :])
