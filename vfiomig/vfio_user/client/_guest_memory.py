"""Guest memory a vfio-user client provides (the VMM's RAM, as a test or a tool needs it).

Each `GuestRegion` is a memfd mapped into the client; DMA_MAP hands the server the fd
(it maps the same pages), or none (the server then reaches the region only with DMA_READ
/ DMA_WRITE messages, which `GuestMemory.serve` answers). `read` / `write` / `view` are
the VMM's side: what the guest would see.

`serve` checks every field of the server's request before touching memory: the payload
length for the command, a count within what we advertised (``max_data_xfer_size``), a
range that does not wrap and lies inside one region, and the region's DMA_MAP flags
(READ for DMA_READ, WRITE for DMA_WRITE). A bad one is refused with an errno (EINVAL,
EFAULT, EACCES), never served in part.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field

from vfiomig.vfio_user._device_info import DmaAccess
from vfiomig.vfio_user._header import Command, ProtocolError
from vfiomig.vfio_user._layouts import DMA_ACCESS, DMA_FLAG_READ, DMA_FLAG_WRITE
from vfiomig.vfio_user._messages import Opaque
from vfiomig.vfio_user._protocol import Buffer, Message

PAGE = mmap.PAGESIZE


@dataclass(slots=True, eq=False)
class GuestRegion:
    """One range of guest memory: ``size`` bytes at ``iova``, in a memfd of its own."""

    iova: int
    size: int
    flags: int
    fd: int
    memory: mmap.mmap
    shared: bool  # DMA_MAP passed the fd: the server maps it too

    @property
    def end(self) -> int:
        return self.iova + self.size

    def close(self) -> None:
        try:
            self.memory.close()
        except BufferError:
            pass  # a view of it is still held: the mapping goes with the last one
        os.close(self.fd)


@dataclass(slots=True)
class GuestMemory:
    """The client's guest memory regions, by iova; see the module docstring."""

    max_count: int
    regions: list[GuestRegion] = field(default_factory=list)
    #: DMA_READ / DMA_WRITE requests answered, and bytes they moved.
    reads: int = 0
    writes: int = 0

    def allocate(self, iova: int, size: int, *, flags: int, shared: bool) -> GuestRegion:
        """A new zero-filled region (page aligned, not overlapping another)."""
        if size <= 0 or (iova | size) % PAGE or iova + size > 1 << 64:
            raise ValueError(f"guest memory {iova:#x}+{size:#x} (page aligned, non-empty)")
        for region in self.regions:
            if iova < region.end and region.iova < iova + size:
                raise ValueError(
                    f"guest memory {iova:#x}+{size:#x} overlaps {region.iova:#x}+{region.size:#x}"
                )
        fd = os.memfd_create(f"guest-{iova:#x}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        region = GuestRegion(iova, size, flags, fd, memory, shared)
        self.regions.append(region)
        return region

    def remove(self, region: GuestRegion) -> None:
        self.regions.remove(region)
        region.close()

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()

    def find(self, iova: int, count: int) -> GuestRegion:
        """The region holding all of ``iova+count``; OSError(EFAULT) if none does."""
        for region in self.regions:
            if region.iova <= iova and iova + count <= region.end:
                return region
        raise OSError(errno.EFAULT, f"guest memory {iova:#x}+{count:#x} is not one region")

    def view(self, iova: int, count: int) -> memoryview:
        """A writable view of guest memory (inside one region)."""
        region = self.find(iova, count)
        start = iova - region.iova
        return memoryview(region.memory)[start : start + count]

    def read(self, iova: int, count: int) -> bytes:
        with self.view(iova, count) as view:
            return bytes(view)

    def write(self, iova: int, data: Buffer) -> None:
        src = memoryview(data).cast("B")
        with self.view(iova, len(src)) as view:
            view[:] = src

    def serve(self, msg: Message) -> Buffer:
        """The reply payload to the server's DMA_READ / DMA_WRITE ``msg``.

        Raises:
            OSError: EINVAL for a malformed request or a count above `max_count`, EFAULT
                for a range outside every region, EACCES for a region mapped without the
                access the command needs.
        """
        body = msg.body
        name = Command(msg.command).name
        if not isinstance(body, Opaque):
            raise OSError(errno.EINVAL, f"{name} body could not be read")
        try:
            access = DmaAccess.unpack(body.data)
        except ProtocolError as exc:
            raise OSError(errno.EINVAL, exc.message) from None
        what = f"{name} {access.addr:#x}+{access.count:#x}"
        write = msg.command == Command.DMA_WRITE
        carried = len(access.data)
        if access.count == 0 or access.count > self.max_count:
            raise OSError(errno.EINVAL, f"{what}: count (max {self.max_count:#x})")
        if carried != (access.count if write else 0):
            raise OSError(errno.EINVAL, f"{what}: carries {carried} bytes")
        if access.addr + access.count > 1 << 64:
            raise OSError(errno.EINVAL, f"{what}: wraps")
        region = self.find(access.addr, access.count)
        need = DMA_FLAG_WRITE if write else DMA_FLAG_READ
        if not region.flags & need:
            raise OSError(errno.EACCES, f"{what}: region flags {region.flags:#x}")
        head = DMA_ACCESS.pack(access.addr, access.count)
        if write:
            self.write(access.addr, access.data)
            self.writes += 1
            return head
        self.reads += 1
        return head + self.read(access.addr, access.count)
