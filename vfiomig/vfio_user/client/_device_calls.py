"""The VMM's side of a vfio-user device, as calls on `VfioUserClient` (its `DeviceCalls`
base): learn the device (DEVICE_GET_INFO, GET_REGION_INFO with its sparse-mmap areas,
GET_IRQ_INFO), mmap a region's areas through the fd the server passes, take its
ioeventfds (GET_REGION_IO_FDS), batch posted writes (REGION_WRITE_MULTI), wire interrupts
to eventfds and mask them (SET_IRQS), give the device guest memory (DMA_MAP / DMA_UNMAP of memfds the
client owns, `GuestMemory`), and dirty-page logging (DEVICE_FEATURE DMA_LOGGING_*).

Every reply is checked before use; a malformed one breaks the connection
(`ProtocolError`), an ERROR reply raises `VfioUserCommandError` naming the command, the
step and the errno. The eventfds, mappings and memfds made here belong to the client and
are closed with it.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence
from typing import Final

from vfiomig._core._errors import SinkError
from vfiomig.transport import close_fds
from vfiomig.vfio_user._device_info import DeviceInfo, IrqInfo, sparse_areas
from vfiomig.vfio_user._header import Command, ProtocolError
from vfiomig.vfio_user._layouts import (
    BITMAP,
    DMA_FLAG_READ,
    DMA_FLAG_WRITE,
    DMA_MAP,
    DMA_UNMAP,
    FEATURE_DMA_LOGGING_REPORT,
    FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP,
    IO_FDS,
    IRQ_SET,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    LOGGING_CONTROL,
    LOGGING_RANGE,
    LOGGING_REPORT,
    MULTI_COUNT,
    MULTI_MAX,
    MULTI_ONE,
    REGION_INFO_SIZE,
    UNMAP_FLAG_GET_DIRTY_BITMAP,
    RegionInfo,
    bitmap_size,
)
from vfiomig.vfio_user._messages import Body, Opaque
from vfiomig.vfio_user._migration_bodies import (
    FEATURE_GET,
    FEATURE_HEADER_SIZE,
    FEATURE_SET,
    DeviceFeature,
)
from vfiomig.vfio_user._protocol import Buffer
from vfiomig.vfio_user._version import Capabilities
from vfiomig.vfio_user.client._guest_memory import GuestMemory, GuestRegion
from vfiomig.vfio_user.client._interrupts import Interrupt
from vfiomig.vfio_user.client._io_fds import RegionIoFd, parse_io_fds
from vfiomig.vfio_user.client._regions import DeviceRegion, MappedRegion

#: The largest GET_REGION_INFO reply asked for (the server says how much it needs).
MAX_REGION_INFO: Final = 64 * 1024


class DeviceCalls:
    """The device side of the protocol; mixed into `VfioUserClient` (see the module)."""

    path: str
    broken: bool
    guest: GuestMemory
    server_capabilities: Capabilities
    _interrupts: list[Interrupt]
    _mapped: list[MappedRegion]
    _io_fds: list[int]

    # Provided by the client.
    def _where(self) -> str:
        raise NotImplementedError

    async def request(
        self, command: Command, payload: Buffer | Sequence[Buffer], what: str = ""
    ) -> Body:
        raise NotImplementedError

    async def request_fds(
        self,
        command: Command,
        payload: Buffer | Sequence[Buffer],
        fds: Sequence[int] = (),
        *,
        what: str = "",
    ) -> tuple[Body, list[int]]:
        raise NotImplementedError

    def _bad_reply(self, text: str) -> ProtocolError:
        self.broken = True
        return ProtocolError(f"{self._where()}: {text}")

    # ------------------------------------------------------------------ info

    async def device_info(self) -> DeviceInfo:
        """DEVICE_GET_INFO: flags (RESET, PCI), the number of regions and IRQ indexes."""
        body = await self.request(Command.DEVICE_GET_INFO, DeviceInfo.request())
        assert isinstance(body, Opaque)
        try:
            return DeviceInfo.unpack(body.data)
        except ProtocolError as exc:
            raise self._bad_reply(exc.message) from None

    async def _region_info_fds(self, index: int) -> tuple[RegionInfo, list[int]]:
        """GET_REGION_INFO with room for every capability (asked again with the argsz the
        first reply names, as a VMM does), and the fds the last reply carried."""
        argsz = REGION_INFO_SIZE
        what = f"region {index} info"
        for _ in range(2):
            body, fds = await self.request_fds(
                Command.DEVICE_GET_REGION_INFO, RegionInfo.request(index, argsz).pack(), what=what
            )
            assert isinstance(body, RegionInfo)
            if body.index != index:
                close_fds(fds)
                raise self._bad_reply(f"{what}: reply is for region {body.index}")
            if body.argsz <= argsz or body.caps:
                return body, fds
            close_fds(fds)
            if body.argsz > MAX_REGION_INFO:
                raise self._bad_reply(f"{what}: argsz {body.argsz} (max {MAX_REGION_INFO})")
            argsz = body.argsz
        raise self._bad_reply(f"{what}: argsz {argsz} still too small")

    async def region(self, index: int) -> DeviceRegion:
        """GET_REGION_INFO with its capabilities read: size, flags, mmappable areas."""
        info, fds = await self._region_info_fds(index)
        close_fds(fds)
        return self._device_region(info)

    def _device_region(self, info: RegionInfo) -> DeviceRegion:
        try:
            areas = sparse_areas(info)
        except ProtocolError as exc:
            raise self._bad_reply(exc.message) from None
        return DeviceRegion(info.index, info.size, info.flags, info.offset, tuple(areas))

    async def map_region(self, index: int) -> MappedRegion:
        """mmap region ``index``'s sparse areas through the fd its GET_REGION_INFO reply
        carries (closed with the client, or with `MappedRegion.close`)."""
        info, fds = await self._region_info_fds(index)
        try:
            region = self._device_region(info)
            if not region.mappable or len(fds) != 1:
                raise SinkError(
                    f"{self._where()}: region {index} offers no mmap "
                    f"(flags {region.flags:#x}, {len(region.areas)} areas, {len(fds)} fds)",
                    errno=_errno.ENODEV,
                )
            mapped = MappedRegion.map(region, fds[0])
        finally:
            close_fds(fds)
        self._mapped.append(mapped)
        return mapped

    async def irq_info(self, index: int) -> IrqInfo:
        """DEVICE_GET_IRQ_INFO: flags (EVENTFD, MASKABLE, ...) and vector count of ``index``."""
        body = await self.request(
            Command.DEVICE_GET_IRQ_INFO, IrqInfo.request(index), f"irq {index} info"
        )
        assert isinstance(body, Opaque)
        try:
            info = IrqInfo.unpack(body.data)
        except ProtocolError as exc:
            raise self._bad_reply(exc.message) from None
        if info.index != index:
            raise self._bad_reply(f"irq {index} info: reply is for index {info.index}")
        return info

    async def region_io_fds(self, index: int) -> list[RegionIoFd]:
        """DEVICE_GET_REGION_IO_FDS: the ioeventfds of region ``index`` (empty if it has
        none), asked twice as a VMM does: for the size the reply needs, then for it. Their
        fds are the client's (closed with it). The server refuses (EINVAL) to send more
        fds than the client's ``max_msg_fds``."""
        what = f"region {index} io fds"
        body = await self.request(
            Command.DEVICE_GET_REGION_IO_FDS, IO_FDS.pack(IO_FDS.size, 0, index, 0), what
        )
        assert isinstance(body, Opaque)
        if len(body.data) < IO_FDS.size:
            raise self._bad_reply(f"{what} reply of {len(body.data)} bytes")
        argsz, _, _, count = IO_FDS.unpack_from(body.data)
        if not count:
            return []
        body, fds = await self.request_fds(
            Command.DEVICE_GET_REGION_IO_FDS, IO_FDS.pack(argsz, 0, index, 0), what=what
        )
        self._io_fds += fds
        assert isinstance(body, Opaque)
        try:
            return parse_io_fds(index, body.data, fds)
        except ProtocolError as exc:
            raise self._bad_reply(exc.message) from None

    async def region_write_multi(self, writes: Sequence[tuple[int, int, Buffer]]) -> None:
        """REGION_WRITE_MULTI (QEMU's batched posted writes): each ``(index, offset,
        data)``, ``data`` of 1 to 8 bytes, applied in order by the server; the first that
        fails stops the rest and its errno raises `VfioUserCommandError`. At most
        `MULTI_MAX` writes, to a server that offers ``write_multiple`` (VERSION)."""
        if not 0 < len(writes) <= MULTI_MAX:
            raise ValueError(f"region write multi of {len(writes)} writes (1 to {MULTI_MAX})")
        parts = [MULTI_COUNT.pack(len(writes))]
        for index, offset, data in writes:
            piece = bytes(data)
            if not 0 < len(piece) <= 8:
                raise ValueError(f"region write multi of {len(piece)} bytes (1 to 8)")
            parts.append(MULTI_ONE.pack(offset, index, len(piece), piece))
        await self.request(Command.REGION_WRITE_MULTI, b"".join(parts), "region write multi")

    # ------------------------------------------------------------------ interrupts

    async def set_irq_eventfds(self, index: int, start: int = 0, count: int = 1) -> list[Interrupt]:
        """Wire vectors ``start .. start+count-1`` of IRQ ``index`` to new eventfds
        (SET_IRQS TRIGGER | DATA_EVENTFD, in messages of at most the server's
        ``max_msg_fds``); `Interrupt.wait` awaits one."""
        made = [
            Interrupt(
                index, start + i, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC), self._where()
            )
            for i in range(count)
        ]
        per_message = max(1, self.server_capabilities.max_msg_fds or 1)
        try:
            for first in range(0, count, per_message):
                batch = made[first : first + per_message]
                flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
                head = IRQ_SET.pack(IRQ_SET.size, flags, index, start + first, len(batch))
                await self.request_fds(
                    Command.DEVICE_SET_IRQS,
                    head,
                    [irq.fd for irq in batch],
                    what=f"irq {index} eventfds {start + first}+{len(batch)}",
                )
        except BaseException:
            for irq in made:
                irq.close()
            raise
        self._interrupts += made
        return made

    async def mask_irqs(self, index: int, start: int, count: int, *, masked: bool = True) -> None:
        """SET_IRQS MASK (or UNMASK with ``masked=False``) | DATA_NONE of vectors
        ``start .. start+count-1`` of IRQ ``index``."""
        action = IRQ_SET_ACTION_MASK if masked else IRQ_SET_ACTION_UNMASK
        head = IRQ_SET.pack(IRQ_SET.size, IRQ_SET_DATA_NONE | action, index, start, count)
        word = "mask" if masked else "unmask"
        await self.request(Command.DEVICE_SET_IRQS, head, f"irq {index} {word} {start}+{count}")

    async def disable_irqs(self, index: int) -> None:
        """SET_IRQS TRIGGER | DATA_NONE with count 0: the device forgets every eventfd of
        ``index`` (ours stay open until the client closes)."""
        head = IRQ_SET.pack(IRQ_SET.size, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, index, 0, 0)
        await self.request(Command.DEVICE_SET_IRQS, head, f"irq {index} disable")

    # ------------------------------------------------------------------ guest memory

    async def map_dma(
        self,
        iova: int,
        size: int,
        *,
        readable: bool = True,
        writable: bool = True,
        with_fd: bool = True,
    ) -> GuestRegion:
        """Allocate ``size`` bytes of guest memory at ``iova`` (a memfd) and DMA_MAP it;
        ``with_fd=False`` maps it without the fd, so the device reaches it only with
        DMA_READ / DMA_WRITE messages (answered by `serve_requests`, or while a request
        waits). Read and write it with ``client.guest``."""
        flags = (DMA_FLAG_READ if readable else 0) | (DMA_FLAG_WRITE if writable else 0)
        region = self.guest.allocate(iova, size, flags=flags, shared=with_fd)
        payload = DMA_MAP.pack(DMA_MAP.size, flags, 0, iova, size)
        try:
            await self.request_fds(
                Command.DMA_MAP,
                payload,
                [region.fd] if with_fd else [],
                what=f"dma map {iova:#x}+{size:#x}",
            )
        except BaseException:
            self.guest.remove(region)
            raise
        return region

    async def unmap_dma(self, region: GuestRegion, *, dirty_page_size: int = 0) -> bytes:
        """DMA_UNMAP ``region``; its memory is released once the server let go of it.

        With ``dirty_page_size`` (and DMA logging on) the reply carries the region's dirty
        bitmap in pages of that size (GET_DIRTY_BITMAP), which is returned; else ``b""``.
        """
        what = f"dma unmap {region.iova:#x}+{region.size:#x}"
        if not dirty_page_size:
            payload = DMA_UNMAP.pack(DMA_UNMAP.size, 0, region.iova, region.size)
            await self.request(Command.DMA_UNMAP, payload, what)
            self.guest.remove(region)
            return b""
        size = bitmap_size(region.size, dirty_page_size)
        argsz = DMA_UNMAP.size + BITMAP.size + size
        flags = UNMAP_FLAG_GET_DIRTY_BITMAP
        payload = DMA_UNMAP.pack(argsz, flags, region.iova, region.size)
        body = await self.request(
            Command.DMA_UNMAP, payload + BITMAP.pack(dirty_page_size, size), what
        )
        assert isinstance(body, Opaque)
        if len(body.data) != argsz:
            raise self._bad_reply(f"{what}: reply of {len(body.data)} bytes (expected {argsz})")
        if BITMAP.unpack_from(body.data, DMA_UNMAP.size) != (dirty_page_size, size):
            raise self._bad_reply(f"{what}: reply bitmap is for another page size")
        self.guest.remove(region)
        return body.data[DMA_UNMAP.size + BITMAP.size :]

    # ------------------------------------------------------------------ dirty logging

    async def dma_logging_start(
        self, page_size: int, ranges: Sequence[tuple[int, int]] = ()
    ) -> None:
        """DMA_LOGGING_START over ``ranges`` of ``(iova, length)`` (none: every mapping)."""
        data = LOGGING_CONTROL.pack(page_size, len(ranges), 0) + b"".join(
            LOGGING_RANGE.pack(iova, length) for iova, length in ranges
        )
        feature = DeviceFeature(
            FEATURE_HEADER_SIZE + len(data), FEATURE_SET | FEATURE_DMA_LOGGING_START, data
        )
        await self.request(Command.DEVICE_FEATURE, feature.pack(), "DMA_LOGGING_START")

    async def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """DMA_LOGGING_REPORT: the dirty bitmap of ``iova+length`` in ``page_size`` pages
        (bit ``i`` of byte ``i // 8``: page ``i`` was written); reported pages are clean."""
        size = bitmap_size(length, page_size)
        feature = DeviceFeature(
            FEATURE_HEADER_SIZE + LOGGING_REPORT.size + size,
            FEATURE_GET | FEATURE_DMA_LOGGING_REPORT,
            LOGGING_REPORT.pack(iova, length, page_size),
        )
        what = f"DMA_LOGGING_REPORT {iova:#x}+{length:#x}"
        body = await self.request(Command.DEVICE_FEATURE, feature.pack(), what)
        assert isinstance(body, DeviceFeature)
        if len(body.data) != LOGGING_REPORT.size + size:
            raise self._bad_reply(
                f"{what}: reply carries {len(body.data)} bytes (expected {LOGGING_REPORT.size + size})"
            )
        if LOGGING_REPORT.unpack_from(body.data) != (iova, length, page_size):
            raise self._bad_reply(f"{what}: reply is for another range")
        return body.data[LOGGING_REPORT.size :]

    async def dma_logging_stop(self) -> None:
        feature = DeviceFeature(FEATURE_HEADER_SIZE, FEATURE_SET | FEATURE_DMA_LOGGING_STOP)
        await self.request(Command.DEVICE_FEATURE, feature.pack(), "DMA_LOGGING_STOP")

    def _close_device_resources(self) -> None:
        for irq in self._interrupts:
            irq.close()
        self._interrupts.clear()
        for mapped in self._mapped:
            mapped.close()
        self._mapped.clear()
        close_fds(self._io_fds)
        self._io_fds.clear()
        self.guest.close()
