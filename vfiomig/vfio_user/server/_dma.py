"""Guest memory as the client maps it (DMA_MAP / DMA_UNMAP), and the emulator's way into it.

`Dma` keeps the client's DMA regions. A region mapped with an fd is mmapped into the
server and the emulator reaches it directly (`Dma.get` returns a ``memoryview`` of it);
a region without an fd is only reachable through DMA_READ / DMA_WRITE messages that the
server sends to the client (`Dma.read` / `Dma.write`, which also work on mapped regions,
like libvfio-user's ``vfu_sgl_read``/``vfu_sgl_write``).

Everything the client sends is checked first: a range must be non-empty, page aligned,
not wrap past 2**64, not overlap a mapped region; an fd must be a regular file long
enough for the mapping (so that touching it cannot raise SIGBUS, unless the client
truncates the file later: libvfio-user has the same exposure). Dirty pages are logged
while DMA logging is on (`Dma.mark_dirty`, `Dma.put` of a writable view) for the regions
mapped with an fd, the only memory the server writes itself (as libvfio-user: the
client sees its own writes for the DMA_WRITE messages), in a `DirtyLog` that costs
nothing until the emulator writes (`_dirty`).

A reply to the server's DMA_READ / DMA_WRITE must echo the address and count asked for
and carry exactly the bytes read: anything else fails that one request with EIO.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from vfiomig.vfio_user._header import Command
from vfiomig.vfio_user._layouts import DMA_ACCESS, DMA_FLAG_READ, DMA_FLAG_WRITE, bitmap_size
from vfiomig.vfio_user.server._dirty import DirtyLog

PAGE: Final = mmap.PAGESIZE
#: libvfio-user's MAX_DMA_REGIONS.
MAX_REGIONS: Final = 64
#: The largest region accepted (libvfio-user's MAX_DMA_SIZE on 64-bit hosts: 8 TiB).
MAX_REGION_SIZE: Final = 8 << 40
_U64: Final = 1 << 64

#: How the server reaches the client: ``send(command, payload) -> reply payload``.
Messenger = Callable[[int, bytes], Awaitable[bytes]]


def _fail(code: int, text: str) -> OSError:
    return OSError(code, text)


@dataclass(slots=True, eq=False)
class DmaRegion:
    """One DMA_MAP'd range of guest memory."""

    iova: int
    size: int
    flags: int
    offset: int
    mapping: mmap.mmap | None = None
    dirty: DirtyLog | None = None  # while logging is on, for a region mapped with an fd
    views: int = 0  # `Dma.get` views not yet `put`

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def mapped(self) -> bool:
        return self.mapping is not None


@dataclass(frozen=True, slots=True)
class Sg:
    """A piece of guest memory inside one region: libvfio-user's ``dma_sg_t``."""

    region: DmaRegion
    iova: int
    length: int
    writable: bool

    @property
    def start(self) -> int:
        """Offset of this piece inside its region."""
        return self.iova - self.region.iova


@dataclass(slots=True)
class Dma:
    """The client's DMA regions; the emulator's scatter-gather API.

    ``max_regions`` bounds how many regions a client may map. The server sets
    ``messenger`` while a client is connected and ``client_max_xfer`` from its VERSION.
    """

    max_regions: int = MAX_REGIONS
    regions: list[DmaRegion] = field(default_factory=list)
    log_pgsize: int = 0  # 0: dirty logging off
    messenger: Messenger | None = None
    client_max_xfer: int = 1024 * 1024
    on_map: Callable[[DmaRegion], None] | None = None
    on_unmap: Callable[[DmaRegion], None] | None = None

    # ------------------------------------------------------------------ client commands

    def map(self, iova: int, size: int, offset: int, flags: int, fd: int | None) -> DmaRegion:
        """DMA_MAP: add a region (the fd is duplicated by mmap; the caller closes its own).

        Raises:
            OSError: EINVAL for a bad range or flags, EEXIST for an overlap, ENOSPC when
                ``max_regions`` are mapped, or the errno of a failed fstat/mmap.
        """
        if flags & ~(DMA_FLAG_READ | DMA_FLAG_WRITE):
            raise _fail(
                errno.EINVAL,
                f"dma map flags {flags:#x} (known {DMA_FLAG_READ | DMA_FLAG_WRITE:#x})",
            )
        if size == 0 or size > MAX_REGION_SIZE:
            raise _fail(errno.EINVAL, f"dma map size {size:#x} (max {MAX_REGION_SIZE:#x})")
        if iova + size > _U64 or (iova | size) % PAGE:
            raise _fail(errno.EINVAL, f"dma map range {iova:#x}+{size:#x} (page {PAGE:#x})")
        for region in self.regions:
            if iova < region.end and region.iova < iova + size:
                raise _fail(
                    errno.EEXIST,
                    f"dma map range {iova:#x}+{size:#x} overlaps {region.iova:#x}+{region.size:#x}",
                )
        if len(self.regions) >= self.max_regions:
            raise _fail(errno.ENOSPC, f"dma regions {len(self.regions)} (max {self.max_regions})")
        region = DmaRegion(iova, size, flags, offset)
        if fd is not None:
            region.mapping = _mmap(fd, size, offset, flags)
        if self.log_pgsize and region.mapping is not None:
            region.dirty = DirtyLog(size, self.log_pgsize)
        self.regions.append(region)
        if self.on_map is not None:
            self.on_map(region)
        return region

    def find_exact(self, iova: int, size: int) -> DmaRegion:
        for region in self.regions:
            if region.iova == iova and region.size == size:
                return region
        raise _fail(errno.ENOENT, f"dma unmap range {iova:#x}+{size:#x} is not a mapped region")

    def unmap(self, region: DmaRegion) -> None:
        """Forget ``region`` and release its mapping (views still held keep it alive)."""
        self.regions.remove(region)
        if self.on_unmap is not None:
            self.on_unmap(region)
        _release(region)

    def unmap_all(self) -> None:
        for region in list(self.regions):
            self.unmap(region)

    # ------------------------------------------------------------------ dirty logging

    def logging_start(self, pgsize: int, ranges: Sequence[tuple[int, int]]) -> None:
        """DMA_LOGGING_START: every range (none: all) must be inside mapped regions.

        Logging again in the same page size changes nothing (libvfio-user), in another
        is EINVAL. Only regions mapped with an fd get a log, and it allocates nothing
        until a page is dirtied.
        """
        if pgsize < PAGE or pgsize & (pgsize - 1) or pgsize > MAX_REGION_SIZE:
            raise _fail(
                errno.EINVAL, f"dma logging page size {pgsize:#x} (a power of 2 >= {PAGE:#x})"
            )
        covered = self._coverage()
        for iova, length in ranges:
            if not covered(iova, length):
                raise _fail(errno.EINVAL, f"dma logging range {iova:#x}+{length:#x} is not mapped")
        if self.log_pgsize:
            if pgsize != self.log_pgsize:
                raise _fail(
                    errno.EINVAL,
                    f"dma logging page size {pgsize:#x} while logging in {self.log_pgsize:#x}",
                )
            return
        self.log_pgsize = pgsize
        for region in self.regions:
            if region.mapping is not None:
                region.dirty = DirtyLog(region.size, pgsize)

    def logging_stop(self) -> None:
        self.log_pgsize = 0
        for region in self.regions:
            region.dirty = None

    def _coverage(self) -> Callable[[int, int], bool]:
        """``covered(iova, length)``: the range lies in mapped regions, adjacent ones
        joined. The regions are sorted once: a request may carry 64 Ki ranges."""
        spans: list[list[int]] = []
        for region in sorted(self.regions, key=lambda r: r.iova):
            if spans and spans[-1][1] == region.iova:
                spans[-1][1] = region.end
            else:
                spans.append([region.iova, region.end])
        starts = [start for start, _ in spans]

        def covered(iova: int, length: int) -> bool:
            i = bisect.bisect_right(starts, iova) - 1
            return length > 0 and i >= 0 and iova + length <= spans[i][1]

        return covered

    def dirty_bitmap(self, iova: int, length: int, pgsize: int, size: int) -> bytes:
        """The dirty bitmap of ``iova+length`` (inside one region) in ``pgsize`` pages,
        ``size`` bytes long; the pages reported are clean afterwards."""
        if not self.log_pgsize:
            raise _fail(errno.EINVAL, "dma logging is off")
        if pgsize < 1 or pgsize & (pgsize - 1) or pgsize > MAX_REGION_SIZE:
            raise _fail(errno.EINVAL, f"dirty bitmap page size {pgsize:#x} (a power of 2)")
        if length == 0 or iova % pgsize or length % pgsize:
            raise _fail(
                errno.EINVAL, f"dirty bitmap range {iova:#x}+{length:#x} (page {pgsize:#x})"
            )
        region = self._region_of(iova, length)
        if region is None:
            raise _fail(
                errno.EINVAL, f"dirty bitmap range {iova:#x}+{length:#x} is not one mapped region"
            )
        if region.dirty is None:
            raise _fail(
                errno.EINVAL,
                f"dirty bitmap range {iova:#x}+{length:#x}: region {region.iova:#x} was mapped "
                "without an fd (the server never writes it)",
            )
        if size != bitmap_size(length, pgsize):
            raise _fail(
                errno.EINVAL, f"dirty bitmap size {size} (expected {bitmap_size(length, pgsize)})"
            )
        return region.dirty.take(iova - region.iova, length, pgsize)

    def _region_of(self, iova: int, length: int) -> DmaRegion | None:
        for region in self.regions:
            if region.iova <= iova and iova + length <= region.end:
                return region
        return None

    # ------------------------------------------------------------------ emulator API

    def translate(self, iova: int, length: int, *, write: bool = False) -> list[Sg]:
        """The pieces of ``iova+length`` (one per region crossed), like ``vfu_addr_to_sgl``.

        Raises:
            OSError: ENOENT when part of the range is not mapped, EACCES when a region
                does not allow the access (``write``: DMA_FLAG_WRITE, else READ).
        """
        if length <= 0 or iova < 0 or iova + length > _U64:
            raise _fail(errno.EINVAL, f"dma range {iova:#x}+{length:#x}")
        need = DMA_FLAG_WRITE if write else DMA_FLAG_READ
        out: list[Sg] = []
        pos, end = iova, iova + length
        while pos < end:
            region = self._region_of(pos, 1)
            if region is None:
                raise _fail(errno.ENOENT, f"dma address {pos:#x} is not mapped")
            if not region.flags & need:
                raise _fail(errno.EACCES, f"dma region {region.iova:#x} flags {region.flags:#x}")
            take = min(end, region.end) - pos
            out.append(Sg(region, pos, take, write))
            pos += take
        return out

    def get(self, sg: Sg) -> memoryview:
        """A view of ``sg``'s memory (mapped regions only); give it back with `put`."""
        if sg.region not in self.regions or sg.region.mapping is None:
            raise _fail(
                errno.EFAULT, f"dma region {sg.region.iova:#x} is not mapped into the server"
            )
        view = memoryview(sg.region.mapping)[sg.start : sg.start + sg.length]
        sg.region.views += 1
        return view if sg.writable else view.toreadonly()

    def put(self, sg: Sg, view: memoryview) -> None:
        """Release a view from `get`; a writable one marks its pages dirty."""
        view.release()
        sg.region.views -= 1
        if sg.writable:
            self.mark_dirty([sg])

    def mark_dirty(self, sgs: Sequence[Sg]) -> None:
        """Log ``sgs`` as written (a no-op while logging is off)."""
        for sg in sgs:
            log = sg.region.dirty
            if log is not None and sg.length > 0:
                log.mark(sg.start, sg.length)

    async def read(self, sgs: Sequence[Sg]) -> bytes:
        """Read guest memory with DMA_READ messages (chunked to the client's limit).

        Raises:
            OSError: the client's errno, ENOTCONN without a client, ETIMEDOUT when a reply
                takes longer than the server's DMA_REPLY_TIMEOUT.

        Cancellation: safe; a reply that arrives later is dropped.
        """
        parts: list[memoryview] = []
        for sg in sgs:
            for addr, count in self._chunks(sg):
                reply = await self._send(Command.DMA_READ, DMA_ACCESS.pack(addr, count))
                _check_reply("read", reply, addr, count, DMA_ACCESS.size + count)
                parts.append(memoryview(reply)[DMA_ACCESS.size :])
        return b"".join(parts)

    async def write(self, sgs: Sequence[Sg], data: bytes | bytearray | memoryview) -> None:
        """Write guest memory with DMA_WRITE messages; ``data`` covers every piece.

        Raises and cancels like `read`; after a cancellation or an error, a prefix of
        the pieces may have been written.
        """
        view = memoryview(data).cast("B")
        total = sum(sg.length for sg in sgs)
        if len(view) != total:
            raise ValueError(f"dma write of {len(view)} bytes for {total} bytes of guest memory")
        pos = 0
        for sg in sgs:
            if not sg.writable:
                raise _fail(errno.EACCES, f"dma write through a read-only sg at {sg.iova:#x}")
            for addr, count in self._chunks(sg):
                reply = await self._send(
                    Command.DMA_WRITE, DMA_ACCESS.pack(addr, count) + view[pos : pos + count]
                )
                _check_reply("write", reply, addr, count, DMA_ACCESS.size)
                pos += count

    def _chunks(self, sg: Sg) -> Iterator[tuple[int, int]]:
        """``(address, count)`` of each message for ``sg``, one at a time: a client that
        says it takes 1 byte per message must not make the server list a million."""
        step = max(1, self.client_max_xfer)
        end = sg.iova + sg.length
        for a in range(sg.iova, end, step):
            yield a, min(step, end - a)

    async def _send(self, command: int, payload: bytes) -> bytes:
        if self.messenger is None:
            raise _fail(errno.ENOTCONN, "no client is connected")
        return await self.messenger(command, payload)


def _check_reply(what: str, reply: bytes, addr: int, count: int, expected: int) -> None:
    """A DMA_READ / DMA_WRITE reply echoes the address and count asked for and is
    ``expected`` bytes long (libvfio-user's client answers so); else EIO."""
    if len(reply) != expected:
        raise _fail(
            errno.EIO,
            f"dma {what} reply for {addr:#x}+{count:#x} of {len(reply)} bytes "
            f"(expected {expected})",
        )
    got_addr, got_count = DMA_ACCESS.unpack_from(reply)
    if (got_addr, got_count) != (addr, count):
        raise _fail(
            errno.EIO,
            f"dma {what} reply for {got_addr:#x}+{got_count:#x} (asked {addr:#x}+{count:#x})",
        )


#: Filesystems whose page faults wait on the network: touching guest memory kept there
#: could stall the server for as long as a stranger likes (FUSE too: ``fuse*``).
_REMOTE_FILESYSTEMS: Final = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "ncpfs", "virtiofs"}
)


def _filesystem(fd: int) -> str:
    """The type of the filesystem ``fd`` lives on (``/proc/self/fdinfo`` and mountinfo);
    "" for a file on no visible mount (a memfd: the kernel's internal shm mount)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
            mount = next((line.split()[1] for line in info if line.startswith(b"mnt_id:")), b"")
        with open("/proc/self/mountinfo", "rb") as mounts:
            for line in mounts:
                fields = line.split()
                if fields and fields[0] == mount and b"-" in fields:
                    return fields[fields.index(b"-") + 1].decode(errors="replace")
    except OSError:
        pass
    return ""


def _mmap(fd: int, size: int, offset: int, flags: int) -> mmap.mmap:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise _fail(errno.EBADF, f"dma map fd: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(errno.EINVAL, f"dma map fd is not a regular file (mode {st.st_mode:#o})")
    kind = _filesystem(fd)
    if kind.startswith("fuse") or kind in _REMOTE_FILESYSTEMS:
        raise _fail(
            errno.EINVAL,
            f"dma map fd is on a {kind} filesystem (a page fault there waits on another "
            "process or the network)",
        )
    if offset % PAGE or offset + size > st.st_size:
        raise _fail(
            errno.EINVAL, f"dma map offset {offset:#x}+{size:#x} (file size {st.st_size:#x})"
        )
    prot = (mmap.PROT_READ if flags & DMA_FLAG_READ else 0) | (
        mmap.PROT_WRITE if flags & DMA_FLAG_WRITE else 0
    )
    try:
        return mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED, prot=prot or mmap.PROT_READ, offset=offset
        )
    except (OSError, ValueError, OverflowError) as exc:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
        raise _fail(code, f"dma map mmap: {exc}") from None


def _release(region: DmaRegion) -> None:
    mapping, region.mapping = region.mapping, None
    region.dirty = None
    if mapping is not None:
        try:
            mapping.close()
        except BufferError:
            pass  # the emulator still holds a view: the mapping goes when the view does
