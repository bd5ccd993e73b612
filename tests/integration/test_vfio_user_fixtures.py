"""A device written from docs/vfio-user-emulators.md, tested the way its guide's "testing
your device" section says: through the ``vfio_user`` fixture (vfiomig.testing.vfio_user)
and the library's client: DMA (with and without fds, dirty logging), an interrupt, the
sparse-mmap BAR, and a migration that carries its PCI config space."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from vfiomig._core._errors import SinkError
from vfiomig.testing.vfio_user import VfioUserHarness
from vfiomig.vfio_user import (
    IrqIndex,
    MigState,
    PciConfig,
    Region,
    ResetReason,
    SharedMemory,
    VfioUserCommandError,
    VfioUserDevice,
    msi_cap,
)

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "vfio-user-emulators.md"
REGS = struct.Struct("<QQII")  # source iova, destination iova, length, doorbell
DONE = 0x18  # u32: copies done
MSI = IrqIndex.MSI


class CopyEngine:
    """BAR0: program a copy (source, destination, length), ring the doorbell: the
    device's own task copies guest memory, counts it, and raises MSI vector 0. BAR2 is
    mmappable scratch memory. Migration: the registers and the count."""

    def __init__(self) -> None:
        self.regs = bytearray(0x20)
        self.errors: list[OSError] = []
        self.phase = MigState.RUNNING
        self.outgoing = b""
        self.incoming = bytearray()
        self.scratch = SharedMemory(0x2000, "scratch")
        self.jobs_in, self.jobs = trio.open_memory_channel[tuple[int, int, int]](4)
        self.device = VfioUserDevice(
            pci=PciConfig(vendor_id=0x1234, device_id=0x11E5, caps=[msi_cap(1)]),
            regions={
                0: Region(len(self.regs), read=self.bar0_read, write=self.bar0_write),
                2: Region(0x2000, memory=self.scratch, mmap_areas=[(0x1000, 0x1000)]),
            },
            irqs={MSI: 1},
            migration=self,
            reset=self.reset,
        )

    # BAR0
    def bar0_read(self, offset: int, count: int) -> bytes:
        return bytes(self.regs[offset : offset + count])

    def bar0_write(self, offset: int, data: memoryview) -> None:
        self.regs[offset : offset + len(data)] = data
        src, dst, length, doorbell = REGS.unpack_from(self.regs)
        if doorbell:
            struct.pack_into("<I", self.regs, 0x14, 0)
            try:
                self.jobs_in.send_nowait((src, dst, length))
            except trio.WouldBlock:
                raise OSError(errno.EBUSY, "copy engine: 4 copies queued already") from None

    async def run(self) -> None:
        """The device's own task: DMA waits for the client, so not in a callback."""
        try:
            await self._copies()
        finally:  # the end of the test: the memfd goes now, not when a GC cycle runs
            self.scratch.close()

    async def _copies(self) -> None:
        dma = self.device.dma
        async for src, dst, length in self.jobs:
            try:
                data = await dma.read(dma.translate(src, length))
                sgs = dma.translate(dst, length, write=True)
                if all(sg.region.mapped for sg in sgs):
                    pos = 0
                    for sg in sgs:  # straight into the mapped memory: dirty-logged
                        view = dma.get(sg)
                        view[:] = data[pos : pos + sg.length]
                        dma.put(sg, view)
                        pos += sg.length
                else:
                    await dma.write(sgs, data)
            except OSError as exc:
                self.errors.append(exc)
                continue
            done = struct.unpack_from("<I", self.regs, DONE)[0]
            struct.pack_into("<I", self.regs, DONE, done + 1)
            self.device.irqs.trigger(MSI, 0, strict=False)

    # Migration: the state is loaded when the device leaves RESUMING, never on a later
    # move to STOP (which would roll a running device back).
    def transition(self, state: MigState) -> None:
        previous, self.phase = self.phase, state
        if state == MigState.STOP_COPY:
            self.outgoing = bytes(self.regs)
        elif state == MigState.RESUMING:
            self.incoming = bytearray()
        elif previous == MigState.RESUMING:
            if len(self.incoming) != len(self.regs):
                self.phase = previous
                raise OSError(errno.EINVAL, f"copy engine state of {len(self.incoming)} bytes")
            self.regs[:] = self.incoming

    def read_data(self, size: int) -> bytes:
        chunk, self.outgoing = self.outgoing[:size], self.outgoing[size:]
        return chunk

    def write_data(self, data: memoryview) -> int:
        self.incoming += data
        return len(data)

    def reset(self, reason: ResetReason) -> None:
        self.regs[:] = bytes(len(self.regs))


async def start_engine(vfio_user: VfioUserHarness) -> CopyEngine:
    engine = CopyEngine()
    vfio_user.nursery.start_soon(engine.run)
    return engine


def program(src: int, dst: int, length: int) -> bytes:
    return REGS.pack(src, dst, length, 1)


async def test_dma_and_an_interrupt(vfio_user: VfioUserHarness) -> None:
    engine = await start_engine(vfio_user)
    with trio.fail_after(20):
        client = await vfio_user.attach(engine.device)
        ram = await client.map_dma(0x100000, 0x4000)  # a memfd the device maps too
        [irq] = await client.set_irq_eventfds(MSI)
        client.guest.write(0x100000, b"hello, device!")
        await client.region_write(0, 0, program(0x100000, 0x102FF8, 14))
        assert await irq.wait() == 1
        assert client.guest.read(0x102FF8, 14) == b"hello, device!"
        assert await client.region_read(0, DONE, 4) == struct.pack("<I", 1)
        assert client.guest.reads >= 1  # the device read through DMA_READ messages
        await client.unmap_dma(ram)
    assert engine.errors == []


async def test_guest_memory_without_fd_goes_through_messages(vfio_user: VfioUserHarness) -> None:
    engine = await start_engine(vfio_user)
    with trio.fail_after(20):
        client = await vfio_user.attach(engine.device)
        await client.map_dma(0x200000, 0x2000, with_fd=False)
        await client.map_dma(0x300000, 0x1000, writable=False, with_fd=False)
        [irq] = await client.set_irq_eventfds(MSI)
        client.guest.write(0x200000, bytes(range(256)) * 32)
        await client.region_write(0, 0, program(0x200000, 0x201000, 0x1000))
        await irq.wait()
        assert client.guest.read(0x201000, 0x1000) == bytes(range(256)) * 16
        assert client.guest.writes >= 1
        # Writing into the read-only mapping is refused, by the device (EACCES) before
        # any message; reading from an unmapped address fails with the device's ENOENT.
        await client.region_write(0, 0, program(0x200000, 0x300000, 16))
        await client.region_write(0, 0, program(0x900000, 0x201000, 16))
        await client.region_write(0, 0, program(0x200000, 0x201000, 4))
        await irq.wait()
    assert [e.errno for e in engine.errors] == [errno.EACCES, errno.ENOENT]


async def test_dirty_logging_reports_what_the_device_wrote(vfio_user: VfioUserHarness) -> None:
    engine = await start_engine(vfio_user)
    with trio.fail_after(20):
        client = await vfio_user.attach(engine.device)
        await client.map_dma(0x400000, 0x8000)
        [irq] = await client.set_irq_eventfds(MSI)
        await client.dma_logging_start(0x1000, [(0x400000, 0x8000)])
        await client.region_write(0, 0, program(0x400000, 0x405000, 0x1800))
        await irq.wait()
        bitmap = await client.dma_logging_report(0x400000, 0x8000, 0x1000)
        assert bitmap == bytes([0b0110_0000]) + bytes(7)  # pages 5 and 6
        assert await client.dma_logging_report(0x400000, 0x8000, 0x1000) == bytes(8)
        # A copy into another mapping, then DMA_UNMAP returns that one's dirty pages.
        other = await client.map_dma(0x500000, 0x4000)
        await client.region_write(0, 0, program(0x400000, 0x502000, 0x10))
        await irq.wait()
        assert await client.unmap_dma(other, dirty_page_size=0x1000) == bytes([0b0100]) + bytes(7)
        await client.dma_logging_stop()


async def test_device_info_regions_mmap_and_irqs(vfio_user: VfioUserHarness) -> None:
    engine = await start_engine(vfio_user)
    with trio.fail_after(20):
        client = await vfio_user.attach(engine.device)
        info = await client.device_info()
        assert (info.num_regions, info.num_irqs) == (9, 5)
        bar2 = await client.region(2)
        assert (bar2.size, bar2.areas, bar2.mappable) == (0x2000, ((0x1000, 0x1000),), True)
        assert not (await client.region(0)).mappable
        mapped = await client.map_region(2)
        with mapped.view(0x1000, 8) as view:
            view[:] = b"mmapped!"  # a store the device sees without a message
        assert await client.region_read(2, 0x1000, 8) == b"mmapped!"
        with pytest.raises(ValueError, match="not inside a mapped area"):
            mapped.view(0, 8)
        msi = await client.irq_info(MSI)
        assert msi.count == 1
        with pytest.raises(VfioUserCommandError, match=r"irq 9 info.*errno 22"):
            await client.irq_info(9)
        [irq] = await client.set_irq_eventfds(MSI)
        with pytest.raises(SinkError, match=r"no interrupt on irq MSI vector 0 within 0\.05 s"):
            await irq.wait(0.05)  # the device raised nothing
        await client.disable_irqs(MSI)
        assert engine.device.irqs.eventfd(MSI, 0) is None


async def test_migration_carries_state_and_pci_config_space(vfio_user: VfioUserHarness) -> None:
    src, dst = await start_engine(vfio_user), await start_engine(vfio_user)
    with trio.fail_after(30):
        client = await vfio_user.attach(src.device)
        await client.map_dma(0x100000, 0x2000)
        [irq] = await client.set_irq_eventfds(MSI)
        await client.region_write(0, 0, program(0x100000, 0x101000, 64))
        await irq.wait()
        # What a VMM programs: BAR0 and BAR2, MSI address, data and enable, then command.
        msi = src.device.pci.cap_offsets[0x05] if src.device.pci else 0
        await client.region_write(7, 0x10, struct.pack("<I", 0xFEBF0000))
        await client.region_write(7, 0x18, struct.pack("<I", 0xFEBE0000))
        await client.region_write(7, msi + 4, struct.pack("<II", 0xFEE00000, 0))
        await client.region_write(7, msi + 12, struct.pack("<H", 0x4041))
        await client.region_write(7, msi + 2, struct.pack("<H", 0x0001))
        await client.region_write(7, 4, struct.pack("<H", 0x0406))
        source_config = await client.region_read(7, 0, 256)
        await vfio_user.detach(client)
        await vfio_user.migrate(src.device, dst.device)
        client = await vfio_user.attach(dst.device)
        assert await client.region_read(7, 0, 256) == source_config
        assert await client.region_read(0, DONE, 4) == struct.pack("<I", 1)
    assert dst.device.pci is not None
    assert (dst.device.pci.command, dst.device.pci.bar(0), dst.device.pci.bar(2)) == (
        0x0406,
        0xFEBF0000,
        0xFEBE0000,
    )
    assert dst.regs == src.regs


async def test_the_guides_testing_section_runs(vfio_user: VfioUserHarness) -> None:
    """The guide's device classes, then its "testing your device" test, as written."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    namespace: dict[str, Any] = {"__name__": "guide"}
    tests = [b for b in blocks if "async def test_" in b]
    assert len(tests) == 1
    for block in [b for b in blocks if "class " in b] + tests:
        exec(compile(block, str(GUIDE), "exec"), namespace)
    with trio.fail_after(20):
        await namespace["test_counter"](vfio_user)
