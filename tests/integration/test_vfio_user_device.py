"""The whole-device server over real UNIX sockets: info, PCI config, IRQs, DMA, hostile input."""

from __future__ import annotations

import array
import errno
import mmap
import os
import random
import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing

from fuzz.vfio_user_server import sample_device
from tests.vfio_user_raw import RawClient, open_fds, serving
from vfiomig.vfio_user import (
    IrqIndex,
    MigState,
    Region,
    ResetReason,
    SharedMemory,
    VfioUserDevice,
)
from vfiomig.vfio_user._header import HEADER, Command
from vfiomig.vfio_user._layouts import (
    DMA_ACCESS,
    DMA_MAP,
    DMA_UNMAP,
    IRQ_SET,
    LOGGING_CONTROL,
    LOGGING_RANGE,
    LOGGING_REPORT,
    REGION_INFO,
)
from vfiomig.vfio_user._migration_bodies import DeviceFeature, MigDataWrite
from vfiomig.vfio_user._version import Capabilities

PAGE = mmap.PAGESIZE
ACCESS = struct.Struct("=QII")
EVENTFD_RW = 0x3  # DMA read | write
TRIGGER_EVENTFD = 0x20 | 0x4
TRIGGER_NONE = 0x20 | 0x1
TRIGGER_BOOL = 0x20 | 0x2
MASK_NONE = 0x08 | 0x1
UNMASK_NONE = 0x10 | 0x1


def make_device(**kwargs: Any) -> VfioUserDevice:
    return sample_device(SharedMemory(2 * PAGE), max_data_xfer_size=64 * 1024, **kwargs)


def memfd(size: int) -> int:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


def pipe_end() -> int:
    read, write = os.pipe()
    os.close(write)
    return read


def region_read(index: int, offset: int, count: int) -> bytes:
    return ACCESS.pack(offset, index, count)


def region_write(index: int, offset: int, data: bytes) -> bytes:
    return ACCESS.pack(offset, index, len(data)) + data


def set_irqs(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    return IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data


def dma_map(addr: int, size: int, offset: int = 0, flags: int = EVENTFD_RW) -> bytes:
    return DMA_MAP.pack(DMA_MAP.size, flags, offset, addr, size)


def dma_unmap(addr: int, size: int, flags: int = 0) -> bytes:
    return DMA_UNMAP.pack(DMA_UNMAP.size, flags, addr, size)


def eventfd_value(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


# --------------------------------------------------------------------------- info, PCI


async def test_device_info_region_info_and_the_mmappable_region() -> None:
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            info = await raw.call(Command.DEVICE_GET_INFO, struct.pack("=IIII", 16, 0, 0, 0))
            assert struct.unpack("=IIII", info.payload) == (16, 0b11, 9, 5)
            small = await raw.call(
                Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(32, 0, 2, 0, 0, 0)
            )
            argsz, flags, _, _, size, _ = REGION_INFO.unpack(small.payload)
            assert (argsz, flags, size, small.fds) == (32 + 16 + 16, 0b0111, 2 * PAGE, [])
            full = await raw.call(
                Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(argsz, 0, 2, 0, 0, 0)
            )
            assert REGION_INFO.unpack_from(full.payload)[1] == 0b1111
            assert struct.unpack_from("=HHIIIQQ", full.payload, 32) == (1, 1, 0, 1, 0, PAGE, PAGE)
            (fd,) = full.fds
            with mmap.mmap(fd, PAGE, offset=PAGE) as shared:
                shared[:4] = b"mmap"
                got = await raw.call(Command.REGION_READ, region_read(2, PAGE, 4))
                assert got.payload[16:] == b"mmap"
            os.close(fd)
            config = await raw.call(
                Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(32, 0, 7, 0, 0, 0)
            )
            assert REGION_INFO.unpack(config.payload)[4] == 4096
            empty = await raw.call(
                Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(32, 0, 5, 0, 0, 0)
            )
            assert REGION_INFO.unpack(empty.payload)[1:5:3] == (0, 0)
            io = await raw.call(Command.DEVICE_GET_REGION_IO_FDS, struct.pack("=IIII", 64, 0, 0, 0))
            assert struct.unpack("=IIII", io.payload) == (16, 0, 0, 0)
            raw.close()


async def test_pci_config_space_ids_bars_command_and_capabilities() -> None:
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)

            async def cfg(offset: int, count: int) -> bytes:
                return (await raw.call(Command.REGION_READ, region_read(7, offset, count))).payload[
                    16:
                ]

            async def cfg_write(offset: int, data: bytes) -> None:
                assert await raw.errno_of(Command.REGION_WRITE, region_write(7, offset, data)) == 0

            assert struct.unpack("<HH", await cfg(0, 4)) == (0x1AF4, 0x10FF)
            assert struct.unpack("<HH", await cfg(0x2C, 4)) == (0x1234, 0x5678)
            assert await cfg(9, 3) == b"\x00\x00\x02"
            await cfg_write(0, b"\xff\xff\xff\xff")  # ids are read-only
            assert struct.unpack("<HH", await cfg(0, 4)) == (0x1AF4, 0x10FF)
            await cfg_write(0x10, b"\xff\xff\xff\xff")  # BAR sizing
            assert struct.unpack("<I", await cfg(0x10, 4))[0] == 0xFFFFFF00
            await cfg_write(0x18, b"\xff\xff\xff\xff")
            assert struct.unpack("<I", await cfg(0x18, 4))[0] == ~(2 * PAGE - 1) & 0xFFFFFFFF
            await cfg_write(0x14, b"\xff\xff\xff\xff")  # no BAR1
            assert await cfg(0x14, 4) == bytes(4)
            await cfg_write(0x10, struct.pack("<I", 0xFEB00000))
            assert device.pci is not None and device.pci.bar(0) == 0xFEB00000
            await cfg_write(4, b"\xff\xff")
            assert struct.unpack("<H", await cfg(4, 2))[0] == 0x0547
            assert struct.unpack("<H", await cfg(6, 2))[0] & 0x10
            ids, pos = [], (await cfg(0x34, 1))[0]
            while pos:
                cap_id, pos = await cfg(pos, 2)
                ids.append(cap_id)
            assert ids == [0x01, 0x05, 0x11, 0x10, 0x09]
            msix = device.pci.cap_offsets[0x11]
            assert struct.unpack("<HII", await cfg(msix + 2, 10)) == (7, 2, 0x802)
            await cfg_write(msix + 2, b"\xff\xff")  # enable + function mask only
            assert struct.unpack("<H", await cfg(msix + 2, 2))[0] == 0xC007
            assert (await cfg(0x3D, 1))[0] == 1  # INTA
            assert await raw.errno_of(Command.REGION_READ, region_read(7, 4090, 8)) == errno.EINVAL
            raw.close()


# --------------------------------------------------------------------------- IRQs


async def test_irqs_eventfds_trigger_mask_unmask_and_bounds() -> None:
    device = make_device()
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                info = await raw.call(
                    Command.DEVICE_GET_IRQ_INFO, struct.pack("=IIII", 16, 0, 2, 0)
                )
                assert struct.unpack("=IIII", info.payload) == (16, 0b11, 2, 8)
                set_fds = set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 1, 2)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, set_fds, efds) == 0
                assert device.irqs.trigger(IrqIndex.MSI, 2)
                assert [eventfd_value(fd) for fd in efds] == [0, 1]
                mask = set_irqs(MASK_NONE, IrqIndex.MSI, 2, 1)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, mask) == 0
                device.irqs.trigger(IrqIndex.MSI, 2)
                assert eventfd_value(efds[1]) == 0
                unmask = set_irqs(UNMASK_NONE, IrqIndex.MSI, 2, 1)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, unmask) == 0
                assert eventfd_value(efds[1]) == 1  # the pending one
                booleans = set_irqs(TRIGGER_BOOL, IrqIndex.MSI, 1, 2, b"\x01\x00")
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, booleans) == 0
                assert [eventfd_value(fd) for fd in efds] == [1, 0]
                none = set_irqs(TRIGGER_NONE, IrqIndex.MSI, 1, 2)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, none) == 0
                assert [eventfd_value(fd) for fd in efds] == [1, 1]
                with pytest.raises(OSError, match="no eventfd"):
                    device.irqs.trigger(IrqIndex.MSI, 0)
                bad = [
                    set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 3, 2),  # past the 4 vectors
                    set_irqs(TRIGGER_EVENTFD, IrqIndex.MSIX, 0, 9),
                    set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 0xFFFFFFFF, 2),  # wraps
                    set_irqs(TRIGGER_EVENTFD, 5, 0, 1),  # no index 5
                    set_irqs(MASK_NONE, IrqIndex.ERR, 0, 1),  # ERR: trigger only
                    set_irqs(TRIGGER_NONE, IrqIndex.MSI, 1, 0),  # count 0 with a start
                    set_irqs(0x20 | 0x8 | 0x1, IrqIndex.MSI, 0, 1),  # two actions
                    set_irqs(TRIGGER_BOOL, IrqIndex.MSI, 0, 2, b"\x01"),  # one bool for two
                    IRQ_SET.pack(8, TRIGGER_NONE, 1, 0, 1),  # argsz too small
                ]
                for payload in bad:
                    assert await raw.errno_of(Command.DEVICE_SET_IRQS, payload) == errno.EINVAL
                # fds that do not match the count are refused, and closed
                before = open_fds()
                extra = [os.eventfd(0) for _ in range(3)]
                got = await raw.errno_of(
                    Command.DEVICE_SET_IRQS, set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 0, 2), extra
                )
                assert got == errno.EINVAL
                for fd in extra:
                    os.close(fd)
                assert open_fds() == before
                raw.close()
                await trio.testing.wait_all_tasks_blocked()  # the server saw the hang-up
            assert device.irqs.eventfd(IrqIndex.MSI, 1) is None  # dropped with the client
    finally:
        for fd in efds:
            os.close(fd)


async def test_fds_go_with_their_message_when_one_read_takes_several() -> None:
    """A request without fds and then SET_IRQS with two eventfds, both sent before the
    server reads: one recvmsg returns both, and the fds belong to the second."""
    device = make_device()
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                info = struct.pack("=IIII", 16, 0, 2, 0)
                irqs = set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 1, 2)
                twin = socket.socket(fileno=os.dup(raw.sock.fileno()))
                with twin:  # synchronous sends: both are queued before the server runs
                    twin.sendmsg([HEADER.pack(50, Command.DEVICE_GET_IRQ_INFO, 32, 0, 0) + info])
                    twin.sendmsg(
                        [HEADER.pack(51, Command.DEVICE_SET_IRQS, 16 + len(irqs), 0, 0) + irqs],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", efds))],
                    )
                first, second = await raw.receive(), await raw.receive()
                assert (first.msg_id, first.errno) == (50, 0)
                assert (second.msg_id, second.errno) == (51, 0), second
                assert device.irqs.trigger(IrqIndex.MSI, 2)
                assert [eventfd_value(fd) for fd in efds] == [0, 1]
                raw.close()
    finally:
        for fd in efds:
            os.close(fd)


# --------------------------------------------------------------------------- DMA


async def test_dma_direct_dirty_logging_and_unmap_with_bitmap() -> None:
    device = make_device()
    fd = memfd(4 * PAGE)
    try:
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                iova = 0x100000
                assert await raw.errno_of(Command.DMA_MAP, dma_map(iova, 4 * PAGE), [fd]) == 0
                ctl = LOGGING_CONTROL.pack(PAGE, 0, 0)
                start = DeviceFeature(8 + len(ctl), 0x20000 | 6, ctl).pack()
                assert await raw.errno_of(Command.DEVICE_FEATURE, start) == 0
                dma = device.dma
                (sg,) = dma.translate(iova + PAGE + 8, 16, write=True)
                view = dma.get(sg)
                view[:] = b"written directly"
                dma.put(sg, view)
                assert os.pread(fd, 16, PAGE + 8) == b"written directly"
                report = LOGGING_REPORT.pack(iova, 4 * PAGE, PAGE)
                get = DeviceFeature(8 + 24 + 8, 0x10000 | 8, report).pack()
                got = await raw.call(Command.DEVICE_FEATURE, get)
                assert not got.is_error and got.payload[32:] == b"\x02" + bytes(7)
                got = await raw.call(Command.DEVICE_FEATURE, get)
                assert got.payload[32:] == bytes(8)  # reported pages are clean again
                dma.mark_dirty(dma.translate(iova + 3 * PAGE, 1))
                unmap = DMA_UNMAP.pack(24 + 16 + 8, 1, iova, 4 * PAGE) + struct.pack("=QQ", PAGE, 8)
                got = await raw.call(Command.DMA_UNMAP, unmap)
                assert got.payload[24:40] == struct.pack("=QQ", PAGE, 8)
                assert got.payload[40:] == b"\x08" + bytes(7)
                assert dma.regions == []
                with pytest.raises(OSError):
                    dma.translate(iova, 1)
                raw.close()
    finally:
        os.close(fd)


async def test_dma_through_messages_to_the_client() -> None:
    device = make_device()
    guest = bytearray(2 * PAGE)
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path, caps=Capabilities(max_data_xfer_size=1000))
            assert await raw.errno_of(Command.DMA_MAP, dma_map(0x4000, 2 * PAGE)) == 0
            results: list[object] = []

            async def emulator() -> None:
                sgs = device.dma.translate(0x4000 + 100, 3000, write=True)
                await device.dma.write(sgs, bytes(range(256)) * 11 + bytes(184))
                results.append(await device.dma.read(sgs))
                try:
                    await device.dma.read(sgs)
                except OSError as exc:
                    results.append(exc.errno)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(emulator)
                requests = 0
                failed = False
                while not failed:
                    req = await raw.receive()
                    addr, count = DMA_ACCESS.unpack_from(req.payload)
                    assert count <= 1000
                    requests += 1
                    offset = addr - 0x4000
                    if req.command == Command.DMA_WRITE:
                        guest[offset : offset + count] = req.payload[16:]
                        await raw.reply(req, req.payload[:16])
                    elif len(results) == 0:
                        await raw.reply(req, req.payload[:16] + guest[offset : offset + count])
                    else:
                        await raw.reply(req, b"", error=errno.EFAULT)
                        failed = True
            assert results == [guest[100:3100], errno.EFAULT]
            assert guest[100:3100] == bytes(range(256)) * 11 + bytes(184)
            assert requests == 3 + 3 + 1
            raw.close()


@pytest.mark.parametrize(
    ("payload", "fd_kind", "expected"),
    [
        (dma_map(0x1001, PAGE), "memfd", errno.EINVAL),  # unaligned address
        (dma_map(0x1000, PAGE + 1), None, errno.EINVAL),  # unaligned size
        (dma_map(0x1000, 0), None, errno.EINVAL),
        (dma_map((1 << 64) - PAGE, 2 * PAGE), None, errno.EINVAL),  # wraps
        (dma_map(0, 1 << 60), None, errno.EINVAL),  # huge
        (dma_map(0x10000, PAGE), None, errno.EEXIST),  # overlaps the mapped one
        (dma_map(0x1000, PAGE, flags=0x4), None, errno.EINVAL),
        (dma_map(0x1000, PAGE), "eventfd", errno.EINVAL),  # cannot be mmapped
        (dma_map(0x1000, PAGE), "pipe", errno.EINVAL),
        (dma_map(0x1000, 4 * PAGE), "memfd", errno.EINVAL),  # file too short: SIGBUS
        (dma_map(0x1000, PAGE, offset=0x10), "memfd", errno.EINVAL),
        (dma_map(0x1000, PAGE), "two", errno.EINVAL),
        (DMA_MAP.pack(8, 3, 0, 0x1000, PAGE), None, errno.EINVAL),  # argsz
        (dma_map(0x1000, PAGE)[:20], None, errno.EINVAL),  # short
        (dma_unmap(0x2000, PAGE), None, errno.ENOENT),
        (dma_unmap(0x10000, PAGE, flags=2), None, errno.EINVAL),  # ALL with a range
        (dma_unmap(0x10000, PAGE, flags=4), None, errno.EINVAL),
        (
            DMA_UNMAP.pack(24 + 16 + 8, 1, 0x10000, PAGE) + struct.pack("=QQ", PAGE, 1 << 40),
            None,
            errno.EINVAL,
        ),
    ],
)
async def test_hostile_dma_requests_get_an_errno(
    payload: bytes, fd_kind: str | None, expected: int
) -> None:
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            assert await raw.errno_of(Command.DMA_MAP, dma_map(0x10000, PAGE)) == 0
            fds: list[int] = []
            if fd_kind == "memfd":
                fds = [memfd(2 * PAGE)]
            elif fd_kind == "eventfd":
                fds = [os.eventfd(0)]
            elif fd_kind == "pipe":
                fds = [pipe_end()]
            elif fd_kind == "two":
                fds = [memfd(PAGE), memfd(PAGE)]
            before = open_fds()
            cmd = (
                Command.DMA_UNMAP
                if struct.unpack_from("=I", payload)[0] in (24, 48)
                else Command.DMA_MAP
            )
            assert await raw.errno_of(cmd, payload, fds) == expected
            assert open_fds() == before
            for fd in fds:
                os.close(fd)
            assert [r.iova for r in device.dma.regions] == [0x10000]
            raw.close()


async def test_dma_logging_on_unmapped_ranges_and_bad_reports() -> None:
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            fd = memfd(PAGE)
            assert await raw.errno_of(Command.DMA_MAP, dma_map(0x10000, PAGE), [fd]) == 0
            os.close(fd)

            def start(pgsize: int, *ranges: tuple[int, int]) -> bytes:
                ctl = LOGGING_CONTROL.pack(pgsize, len(ranges), 0)
                ctl += b"".join(LOGGING_RANGE.pack(*r) for r in ranges)
                return DeviceFeature(8 + len(ctl), 0x20000 | 6, ctl).pack()

            report = DeviceFeature(
                8 + 24 + 8, 0x10000 | 8, LOGGING_REPORT.pack(0x10000, PAGE, PAGE)
            ).pack()
            assert await raw.errno_of(Command.DEVICE_FEATURE, report) == errno.EINVAL  # logging off
            for bad in (
                start(PAGE, (0x20000, PAGE)),
                start(PAGE, (0x10000, 2 * PAGE)),
                start(3000),
            ):
                assert await raw.errno_of(Command.DEVICE_FEATURE, bad) == errno.EINVAL
            lying = start(PAGE, (0x10000, PAGE))[:-16]  # says 1 range, carries none
            assert await raw.errno_of(Command.DEVICE_FEATURE, lying) == errno.EINVAL
            assert await raw.errno_of(Command.DEVICE_FEATURE, start(PAGE, (0x10000, PAGE))) == 0
            for bad_report in (
                LOGGING_REPORT.pack(0x20000, PAGE, PAGE),  # unmapped
                LOGGING_REPORT.pack(0x10000, PAGE, 3),  # not a power of 2
                LOGGING_REPORT.pack(0x10000, 0, PAGE),
            ):
                payload = DeviceFeature(8 + 24 + 8, 0x10000 | 8, bad_report).pack()
                assert await raw.errno_of(Command.DEVICE_FEATURE, payload) == errno.EINVAL
            assert await raw.errno_of(Command.DEVICE_FEATURE, report) == 0
            raw.close()


# --------------------------------------------------------------------------- regions, states


async def test_region_access_out_of_bounds_and_in_the_wrong_state() -> None:
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            for payload in (
                region_read(0, 0xFF, 2),
                region_read(0, (1 << 64) - 1, 2),  # wraps
                region_read(0, 0, 1 << 31),
                region_read(9, 0, 1),
                region_read(0xFFFFFFFF, 0, 1),
                region_read(5, 0, 1),  # an empty region
                region_read(0, 0, 1)[:10],
            ):
                assert await raw.errno_of(Command.REGION_READ, payload) == errno.EINVAL
            short = region_write(0, 0, b"ab")[:-1]  # fewer bytes than count
            assert await raw.errno_of(Command.REGION_WRITE, short) == errno.EINVAL
            stop = DeviceFeature.set_state(MigState.STOP).pack()
            assert await raw.errno_of(Command.DEVICE_FEATURE, stop) == 0
            assert await raw.errno_of(Command.DMA_MAP, dma_map(0x10000, PAGE)) == errno.EINVAL
            assert (
                await raw.errno_of(Command.DEVICE_SET_IRQS, set_irqs(TRIGGER_NONE, 0, 0, 1))
                == errno.EINVAL
            )
            assert (
                await raw.errno_of(Command.MIG_DATA_WRITE, MigDataWrite.of(b"x").pack())
                == errno.EINVAL
            )
            assert await raw.errno_of(Command.REGION_WRITE, region_write(0, 0, b"ok")) == 0
            assert await raw.errno_of(Command.VERSION, b"\0\0\0\0") == errno.EINVAL  # twice
            assert await raw.errno_of(99, b"") == errno.EINVAL
            raw.close()


# --------------------------------------------------------------------------- connections


async def test_one_client_at_a_time_the_next_after_a_disconnect() -> None:
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            first = await RawClient.connect(path)
            second = await RawClient.connect(path, version=False)
            with pytest.raises(EOFError):
                await second.receive()  # refused at once
            second.close()
            assert await first.errno_of(Command.REGION_READ, region_read(0, 0, 4)) == 0
            first.close()
            await trio.testing.wait_all_tasks_blocked()  # the server saw the hang-up
            third = await RawClient.connect(path)
            assert await third.errno_of(Command.REGION_READ, region_read(0, 0, 4)) == 0
            third.close()


@pytest.mark.parametrize("reset_on_disconnect", [False, True])
async def test_lost_connection_resets_only_if_the_emulator_asks(reset_on_disconnect: bool) -> None:
    reasons: list[ResetReason] = []
    device = make_device(reset=reasons.append, reset_on_disconnect=reset_on_disconnect)
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            assert await raw.errno_of(Command.DEVICE_RESET, b"") == 0
            resuming = DeviceFeature.set_state(MigState.RESUMING).pack()
            assert await raw.errno_of(Command.DEVICE_FEATURE, resuming) == 0
            raw.close()
            await trio.testing.wait_all_tasks_blocked()  # the server saw the hang-up
            assert device.state == (MigState.RUNNING if reset_on_disconnect else MigState.RESUMING)
    lost = [ResetReason.LOST_CONNECTION] if reset_on_disconnect else []
    assert reasons == [ResetReason.DEVICE_RESET, *lost]


async def test_pipelined_mig_data_writes_are_answered_in_order_without_copies() -> None:
    seen: list[tuple[bool, bytes]] = []

    class Recorder:
        def transition(self, state: MigState) -> None:
            pass

        def read_data(self, size: int) -> bytes:
            return b""

        def write_data(self, data: memoryview) -> int:
            seen.append((isinstance(data.obj, bytearray), bytes(data)))
            return len(data)

    device = VfioUserDevice(regions={0: Region(8)}, migration=Recorder())
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            assert (
                await raw.errno_of(
                    Command.DEVICE_FEATURE, DeviceFeature.set_state(MigState.RESUMING).pack()
                )
                == 0
            )
            chunks = [bytes([i]) * (1000 + i) for i in range(20)]
            ids = [
                await raw.send(Command.MIG_DATA_WRITE, MigDataWrite.of(c).pack()) for c in chunks
            ]
            replies = [await raw.receive() for _ in chunks]
            assert [r.msg_id for r in replies] == ids
            assert not any(r.is_error for r in replies)
            raw.close()
    assert seen == [(True, c) for c in chunks]


async def test_disconnect_mid_message_and_oversized_messages() -> None:
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            before = open_fds()
            raw = await RawClient.connect(path)
            big = device.max_msg_size + 1
            await raw.send(Command.REGION_WRITE, bytes(100), size=big)
            await raw.sock.send(bytes(big - 116))
            got = await raw.receive()
            assert got.errno == errno.EINVAL
            efd = os.eventfd(0)
            await raw.send(
                Command.DEVICE_SET_IRQS, set_irqs(TRIGGER_EVENTFD, 0, 0, 1), [efd], size=200
            )
            os.close(efd)
            raw.close()
            await trio.testing.wait_all_tasks_blocked()  # the server saw the hang-up
            assert open_fds() == before
            again = await RawClient.connect(path)
            assert await again.errno_of(Command.REGION_READ, region_read(0, 0, 4)) == 0
            again.close()


async def test_no_fd_leaks_after_thousands_of_hostile_messages() -> None:
    device = make_device()
    rng = random.Random(11)
    commands = [c for c in Command if c != Command.VERSION] + [0, 99]
    with trio.fail_after(60):
        async with serving(device) as path:
            baseline = open_fds()
            for _round in range(4):
                raw = await RawClient.connect(path)
                for _ in range(1000):
                    fds = []
                    for _ in range(rng.randrange(4)):
                        kind = rng.randrange(3)
                        fds.append(
                            os.eventfd(0) if kind == 0 else memfd(PAGE) if kind == 1 else pipe_end()
                        )
                    command = rng.choice(commands)
                    if rng.random() < 0.3:
                        payload = rng.choice(
                            [
                                set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 0, len(fds)),
                                dma_map(rng.randrange(0, 64) * PAGE, PAGE),
                                dma_unmap(0, 0, 2),
                                region_write(7, 0x10, b"\xff\xff\xff\xff"),
                            ]
                        )
                        command = {0x14: Command.DEVICE_SET_IRQS, 0x20: Command.DMA_MAP}.get(
                            payload[0],
                            Command.DMA_UNMAP if len(payload) == 24 else Command.REGION_WRITE,
                        )
                    else:
                        payload = rng.randbytes(rng.randrange(48))
                    got = await raw.call(command, payload, fds)
                    for fd in fds + got.fds:
                        os.close(fd)
                raw.close()
                await trio.testing.wait_all_tasks_blocked()  # the server saw the hang-up
                assert open_fds() == baseline
            assert device.dma.regions == []
