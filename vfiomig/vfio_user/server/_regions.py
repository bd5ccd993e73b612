"""Device regions: what REGION_READ/WRITE reach and what GET_REGION_INFO describes.

A `Region` is a size plus the emulator's access callbacks, optionally backed by memory
the client may mmap: `SharedMemory` (a memfd the library makes) or `FileMemory` (the
emulator's own fd and offset, like ``vfu_setup_region(fd, offset)``). The server maps it
too and hands the fd to the client with GET_REGION_INFO (with the file offset), so that
the client may mmap the areas listed in ``mmap_areas`` (the sparse-mmap capability). A
region with memory and no callbacks is served from that memory.

A region may also have ioeventfds (`IoEventFd`, ``vfu_create_ioeventfd``): eventfds the
emulator owns, handed to the client with DEVICE_GET_REGION_IO_FDS, which the VMM signals
on a guest write to that offset (KVM does it without leaving the kernel) instead of
sending a REGION_WRITE. Shadow ioeventfds are not offered.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vfiomig.vfio_user._layouts import REGION_FLAG_READ, REGION_FLAG_WRITE
from vfiomig.vfio_user.server._session import EmulatorError, emulator_error

Buffer = bytes | bytearray | memoryview
#: ``read(offset, count)`` returns exactly ``count`` bytes.
ReadCallback = Callable[[int, int], Buffer]
#: ``write(offset, data)`` takes every byte of ``data`` (a view valid during the call).
WriteCallback = Callable[[int, memoryview], None]


class FileMemory:
    """``size`` bytes of the emulator's file ``fd`` from ``offset`` (both page aligned),
    mapped here (``view``) and shareable with the client.

    The fd stays the emulator's: `close` releases the mapping only. A regular file must
    be long enough for the range (so that touching the mapping cannot fault).
    """

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        if size <= 0 or size % mmap.PAGESIZE or offset < 0 or offset % mmap.PAGESIZE:
            raise ValueError(
                f"file memory {offset:#x}+{size:#x} (page aligned, {mmap.PAGESIZE:#x})"
            )
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
            raise ValueError(
                f"file memory {offset:#x}+{size:#x} past the end of the file ({st.st_size:#x})"
            )
        self.fd = fd
        self.size = size
        self.offset = offset
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=offset)
        self.view = memoryview(self._map)

    def close(self) -> None:
        if not self._map.closed:
            self.view.release()
            self._map.close()


class SharedMemory(FileMemory):
    """``size`` bytes of memfd memory, mapped here and shareable with the client.

    ``view`` is the server's mapping. `close` releases the fd and the mapping.
    """

    def __init__(self, size: int, name: str = "vfio-user-region") -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"shared memory size {size:#x} (a multiple of {mmap.PAGESIZE:#x})")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            super().__init__(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            super().close()
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True, slots=True)
class IoEventFd:
    """An eventfd the VMM signals on a guest write of ``size`` bytes at ``offset`` of the
    region (only a write of ``datamatch``, if given). The emulator owns and reads it."""

    fd: int
    offset: int
    size: int
    datamatch: int | None = None


@dataclass(slots=True)
class Region:
    """One region of the device.

    Args:
        size: bytes; REGION_READ/WRITE past it are EINVAL before any callback runs.
        read / write: the access callbacks (fail with ``OSError(errno, text)``); a
            missing one makes that access EINVAL, unless ``memory`` serves it.
        memory: backing the client may mmap (`SharedMemory` or `FileMemory`;
            ``mmap_areas``: offset/size pairs inside the region, page aligned; default:
            the whole region).
        writable / readable: the flags GET_REGION_INFO reports.
    """

    size: int
    read: ReadCallback | None = None
    write: WriteCallback | None = None
    memory: FileMemory | None = None
    mmap_areas: Sequence[tuple[int, int]] | None = None
    readable: bool = True
    writable: bool = True
    areas: list[tuple[int, int]] = field(default_factory=list, init=False)
    ioeventfds: list[IoEventFd] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.size < 0 or self.size >= 1 << 63:
            raise ValueError(f"region size {self.size:#x} (max {(1 << 63) - 1:#x})")
        if self.memory is None:
            if self.mmap_areas:
                raise ValueError("mmap areas need shared memory")
            return
        if self.memory.size < self.size:
            raise ValueError(f"region memory of {self.memory.size:#x} bytes for {self.size:#x}")
        areas = list(self.mmap_areas) if self.mmap_areas is not None else [(0, self.memory.size)]
        for off, length in areas:
            if length <= 0 or (off | length) % mmap.PAGESIZE or off + length > self.memory.size:
                raise ValueError(
                    f"mmap area {off:#x}+{length:#x} of a {self.memory.size:#x} region"
                )
        self.areas = areas

    @property
    def flags(self) -> int:
        return (REGION_FLAG_READ if self.readable else 0) | (
            REGION_FLAG_WRITE if self.writable else 0
        )

    def do_read(self, offset: int, count: int) -> Buffer:
        if self.read is not None:
            try:
                data = self.read(offset, count)
            except OSError as exc:
                raise _failed(exc, "read", offset, count) from None
            if len(data) != count:
                raise OSError(
                    errno.EINVAL, f"region read returned {len(data)} bytes (expected {count})"
                )
            return data
        if self.memory is not None and self.readable:
            return self.memory.view[offset : offset + count]
        raise OSError(errno.EINVAL, "region is not readable")

    def do_write(self, offset: int, data: memoryview) -> None:
        if self.write is not None:
            try:
                self.write(offset, data)
            except OSError as exc:
                raise _failed(exc, "write", offset, len(data)) from None
        elif self.memory is not None and self.writable:
            self.memory.view[offset : offset + len(data)] = data
        else:
            raise OSError(errno.EINVAL, "region is not writable")


def _failed(exc: OSError, what: str, offset: int, count: int) -> EmulatorError:
    if isinstance(exc, EmulatorError):
        return exc
    return emulator_error(exc, f"region {what} callback at {offset:#x}+{count:#x}")
