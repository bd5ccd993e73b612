"""libvfio-user's ``samples/server.c``, ported to vfiomig.vfio_user.

    python examples/vfio_user_sample_server.py SOCKPATH [-v]

The same device: a PCI function dead:beef (subsystem cafe:babe) with
- BAR0: 8 bytes, a ``time_t``. Writing an absolute time T arms a timer (while RUNNING);
  reading gives the seconds since T. When the timer fires the device raises INTx, then
  does DMA: 4 KiB written and read back on the second DMA region directly (mmapped
  guest memory, pages marked dirty) and on the first through DMA_WRITE / DMA_READ
  messages, checking that what it reads back is what it wrote;
- BAR1: 12 KiB of shared memory, the first and last pages mmappable by the client;
- migration: the stream is BAR1 (in PRE_COPY) and BAR1 then BAR0 (in STOP_COPY); the
  destination checks that the whole stream arrived when it leaves RESUMING and re-arms
  the timer from the migrated BAR0 when it starts RUNNING. Writes
  that fall within BAR1 are received straight into it (``write_buffer``).

Like the C sample it serves one client and exits 0 when that client has gone, which is
what libvfio-user's ``samples/client`` expects of the ``server`` it starts as its
migration destination. ``-v`` logs at debug level.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import struct
import sys
import time
import zlib

import trio

from vfiomig.vfio_user import (
    DmaRegion,
    IrqIndex,
    MigState,
    PciConfig,
    Region,
    ResetReason,
    SharedMemory,
    VfioUserDevice,
    serve_vfio_user,
)

NR_DMA_REGIONS = 96
BAR1_SIZE = 0x3000
TIME = struct.Struct("=q")  # time_t

log = logging.getLogger("sample-server")


class SampleServer:
    """The device state of server.c's ``struct server_data`` and its callbacks."""

    def __init__(self) -> None:
        self.bar0 = 0
        self.bar1 = SharedMemory(BAR1_SIZE, "bar1")
        self.slots: list[DmaRegion | None] = [None] * NR_DMA_REGIONS
        self.state = MigState.RUNNING
        self.bytes_transferred = 0
        self.rearm = False  # arm the timer from BAR0 when the device next runs
        self.deadline: float | None = None  # trio clock
        self.rearmed = trio.Event()
        self.device = VfioUserDevice(
            pci=PciConfig(
                vendor_id=0xDEAD, device_id=0xBEEF, subsys_vendor_id=0xCAFE, subsys_id=0xBABE
            ),
            regions={
                0: Region(TIME.size, read=self.bar0_read, write=self.bar0_write),
                1: Region(BAR1_SIZE, memory=self.bar1, mmap_areas=[(0, 0x1000), (0x2000, 0x1000)]),
            },
            irqs={IrqIndex.INTX: 1},
            migration=self,
            reset=self.reset,
        )
        self.device.dma.on_map = self.dma_register
        self.device.dma.on_unmap = self.dma_unregister

    # ------------------------------------------------------------------ BAR0 and the timer

    def arm_timer(self, when: int) -> None:
        delay = when - int(time.time())  # whole seconds, as setitimer gets them in server.c
        log.debug("arming timer to trigger in %d seconds", delay)
        # A moment that has already come fires at once. server.c passes the delay to
        # setitimer, where 0 disarms: its client writes "now + 1 s", so a write handled
        # after the next second boundary (a slow host) left the client waiting forever
        # for the interrupt; and a deadline that passed during migration fails server.c's
        # transition to RUNNING.
        self.deadline = trio.current_time() + max(delay, 0)
        self.rearmed.set()

    def bar0_read(self, offset: int, count: int) -> bytes:
        self._check_bar0(offset, count)
        return TIME.pack(int(time.time()) - self.bar0)

    def bar0_write(self, offset: int, data: memoryview) -> None:
        self._check_bar0(offset, len(data))
        (value,) = TIME.unpack(data)
        if self.state == MigState.RUNNING:
            self.arm_timer(value)
        self.bar0 = value

    @staticmethod
    def _check_bar0(offset: int, count: int) -> None:
        if count != TIME.size or offset != 0:
            log.error("bad BAR0 access %#x-%#x", offset, offset + count - 1)
            raise OSError(errno.EINVAL, "bad BAR0 access")

    async def run_timer(self) -> None:
        """Fire the interrupt and the DMA when the timer expires (forever)."""
        while True:
            self.rearmed = trio.Event()
            if self.deadline is None:
                await self.rearmed.wait()
                continue
            with trio.move_on_at(self.deadline):
                await self.rearmed.wait()
                continue
            self.deadline = None
            if self.device.irqs.trigger_enabled(0) is None:  # vfu_irq_trigger(ctx, 0)
                log.error("vfu_irq_trigger() failed: no fd for interrupt 0")
                continue
            print("doing dma io", flush=True)
            try:
                await self.do_dma_io(1, use_messages=False)
                await self.do_dma_io(0, use_messages=True)
            except OSError as exc:
                # The client's doing (a region it never mapped, a bad or missing reply to
                # a DMA message, a disconnect): this DMA fails, the device carries on.
                log.error("do_dma_io failed: %s", exc)

    # ------------------------------------------------------------------ DMA

    def dma_register(self, region: DmaRegion) -> None:
        free = next((i for i, slot in enumerate(self.slots) if slot is None), None)
        if free is None:
            raise OSError(errno.ENOSPC, "failed to add dma region, slots full")
        self.slots[free] = region

    def dma_unregister(self, region: DmaRegion) -> None:
        self.slots = [None if slot is region else slot for slot in self.slots]

    async def do_dma_io(self, slot: int, *, use_messages: bool) -> None:
        dma = self.device.dma
        region = self.slots[slot]
        if region is None:
            raise OSError(errno.ENOENT, f"dma slot {slot} is empty")
        size, count = 1024, 4
        buf = bytearray(size * count)
        for i in range(count):
            addr = region.iova + i * size
            sgs = dma.translate(addr, size, write=True)
            buf[i * size : (i + 1) * size] = bytes([ord("A") + i]) * size
            if use_messages:
                log.debug("do_dma_io: MESSAGE WRITE addr %#x size %d", addr, size)
                await dma.write(sgs, buf[i * size : (i + 1) * size])
            else:
                log.debug("do_dma_io: DIRECT WRITE  addr %#x size %d", addr, size)
                view = dma.get(sgs[0])
                view[:] = buf[i * size : (i + 1) * size]
                dma.mark_dirty(sgs)
                dma.put(sgs[0], view)
        crc1 = zlib.crc32(buf)
        buf = bytearray(size * count)
        for i in range(0, count, 2):
            addr = region.iova + i * size
            sgs = dma.translate(addr, 2 * size)
            if use_messages:
                log.debug("do_dma_io: MESSAGE READ  addr %#x size %d", addr, 2 * size)
                buf[i * size : (i + 2) * size] = await dma.read(sgs)
            else:
                log.debug("do_dma_io: DIRECT READ   addr %#x size %d", addr, 2 * size)
                view = dma.get(sgs[0])
                buf[i * size : (i + 2) * size] = view
                dma.put(sgs[0], view)
        if zlib.crc32(buf) != crc1:
            raise OSError(errno.EIO, "DMA write and DMA read mismatch")
        log.debug("do_dma_io: %s success", "MESSAGE" if use_messages else "DIRECT")

    # ------------------------------------------------------------------ reset, migration

    def reset(self, reason: ResetReason) -> None:
        log.debug("device reset callback (%s)", reason.value)

    def transition(self, old: MigState, new: MigState) -> None:
        log.debug("migration: transition to device state %d", new)
        expected = BAR1_SIZE + TIME.size
        if new == MigState.STOP_COPY:
            log.debug("disable timer")
            self.deadline = None
            self.rearmed.set()
            self.bytes_transferred = 0
            self.rearm = True  # if this device runs again (the migration failed)
        elif new in (MigState.PRE_COPY, MigState.RESUMING):
            self.bytes_transferred = 0
        elif old == MigState.STOP_COPY and self.bytes_transferred != expected:
            raise OSError(
                errno.EINVAL, f"{self.bytes_transferred} bytes sent (expected {expected})"
            )
        elif old == MigState.RESUMING:
            # The stream is complete when RESUMING ends (server.c checks it on every
            # move to RUNNING, so a device that was never migrated could not pause).
            if self.bytes_transferred != expected:
                raise OSError(
                    errno.EINVAL, f"{self.bytes_transferred} bytes received (expected {expected})"
                )
            self.rearm = True
        if new == MigState.RUNNING and self.rearm:
            self.rearm = False
            self.arm_timer(self.bar0)
        self.state = new

    def _stream(self) -> bytes:
        return bytes(self.bar1.view) + TIME.pack(self.bar0)

    def read_data(self, size: int) -> bytes:
        total = BAR1_SIZE + (TIME.size if self.state == MigState.STOP_COPY else 0)
        if self.bytes_transferred == total or size == 0:
            log.debug("no data left to read")
            return b""
        start = self.bytes_transferred
        chunk = self._stream()[start : min(start + size, total)]
        self.bytes_transferred += len(chunk)
        return chunk

    def write_buffer(self, size: int) -> memoryview | None:
        """Data for BAR1 is received straight into it; the rest goes to `write_data`."""
        start = self.bytes_transferred
        if start + size > BAR1_SIZE:
            return None
        return self.bar1.view[start : start + size]

    def write_commit(self, size: int) -> None:
        log.debug("migration: %d bytes received straight into BAR1", size)
        self.bytes_transferred += size

    def write_data(self, data: memoryview) -> int:
        total = BAR1_SIZE + TIME.size
        start = self.bytes_transferred
        end = min(start + len(data), total)
        if end <= start:
            return 0
        taken = end - start
        in_bar1 = max(0, min(end, BAR1_SIZE) - start)
        if in_bar1:
            self.bar1.view[start : start + in_bar1] = data[:in_bar1]
        if end > BAR1_SIZE:
            raw = bytearray(TIME.pack(self.bar0))
            at = max(start, BAR1_SIZE) - BAR1_SIZE
            raw[at : end - BAR1_SIZE] = data[in_bar1:taken]
            (self.bar0,) = TIME.unpack(raw)
        self.bytes_transferred += taken
        return taken


async def main(path: str) -> None:
    server = SampleServer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run_timer)
        await serve_vfio_user(path, server.device, once=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", action="store_true", help="log at debug level")
    parser.add_argument("socket", help="the vfio-user socket path to create")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.v else logging.ERROR,
        format=f"server[{os.getpid()}]: %(message)s",
        stream=sys.stderr,
    )
    trio.run(main, args.socket)
