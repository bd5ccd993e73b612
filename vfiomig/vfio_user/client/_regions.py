"""A device region as the client sees it, and the sparse areas it may mmap.

`DeviceRegion` is DEVICE_GET_REGION_INFO's answer with its sparse-mmap capability read
(`vfiomig.vfio_user._device_info.sparse_areas`); `MappedRegion` holds the areas mmapped
through the fd the server passed with the reply: loads and stores in them reach the
device's memory without a message, as a VMM's guest would.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field

from vfiomig.vfio_user._layouts import REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE


@dataclass(frozen=True, slots=True)
class DeviceRegion:
    """Region ``index``: ``size`` bytes at ``offset`` of the server's fd, its flags and
    the ``(offset, size)`` areas it lets the client mmap."""

    index: int
    size: int
    flags: int
    offset: int
    areas: tuple[tuple[int, int], ...] = ()

    @property
    def readable(self) -> bool:
        return bool(self.flags & REGION_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & REGION_FLAG_WRITE)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & REGION_FLAG_MMAP) and bool(self.areas)


@dataclass(slots=True, eq=False)
class MappedRegion:
    """The sparse areas of ``region``, mmapped (shared, read and write)."""

    region: DeviceRegion
    maps: list[tuple[int, mmap.mmap]] = field(default_factory=list)  # (area offset, map)

    @classmethod
    def map(cls, region: DeviceRegion, fd: int) -> MappedRegion:
        out = cls(region)
        try:
            for offset, size in region.areas:
                start = region.offset + offset
                page = start - start % mmap.ALLOCATIONGRANULARITY
                memory = mmap.mmap(fd, size + start - page, offset=page)
                out.maps.append((offset - (start - page), memory))
        except BaseException:
            out.close()
            raise
        return out

    def view(self, offset: int, count: int) -> memoryview:
        """A view of region bytes ``offset .. offset+count`` (inside one mapped area)."""
        for base, memory in self.maps:
            if base <= offset and offset + count <= base + len(memory):
                return memoryview(memory)[offset - base : offset - base + count]
        raise ValueError(
            f"region {self.region.index} {offset:#x}+{count:#x} is not inside a mapped area"
        )

    def close(self) -> None:
        for _, memory in self.maps:
            try:
                memory.close()
            except BufferError:
                pass  # a view is still held: the mapping goes with it
        self.maps.clear()
