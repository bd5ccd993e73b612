"""libvfio-user's device features in the server library, driven over real UNIX sockets:
ioeventfds, mmap areas from the emulator's fd, quiesce, the enabled interrupt type,
per-type IRQ state callbacks, REGION_WRITE_MULTI, the fast path of register accesses, DMA
replies taken by the requesting task and a server in its own thread (the config-space
features are in test_vfio_user_pci_features)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import tempfile
import threading

import pytest
import trio

from tests.vfio_user_raw import RawClient, SyncClient, serving
from vfiomig.vfio_user import (
    DmaRegion,
    FileMemory,
    IrqIndex,
    PciConfig,
    Region,
    VfioUserDevice,
    start_vfio_user_thread,
)
from vfiomig.vfio_user._header import HEADER, Command
from vfiomig.vfio_user._layouts import DMA_MAP, DMA_UNMAP, IO_FDS, IRQ_SET, REGION_INFO
from vfiomig.vfio_user._version import Capabilities
from vfiomig.vfio_user.server._connection import Connection
from vfiomig.vfio_user.server._server_requests import _Pending

PAGE = mmap.PAGESIZE
ACCESS = struct.Struct("=QII")
SUB = struct.Struct("=QQIIIIQQ")
MULTI_ONE = struct.Struct("=QII8s")
TRIGGER_EVENTFD = 0x20 | 0x4
MASK_NONE = 0x08 | 0x1


async def read(raw: RawClient, index: int, offset: int, count: int) -> bytes:
    got = await raw.call(Command.REGION_READ, ACCESS.pack(offset, index, count))
    assert not got.is_error, got
    return got.payload[ACCESS.size :]


async def write(raw: RawClient, index: int, offset: int, data: bytes) -> int:
    return await raw.errno_of(Command.REGION_WRITE, ACCESS.pack(offset, index, len(data)) + data)


def u32(data: bytes) -> int:
    return int.from_bytes(data, "little")


def bar_region(size: int) -> Region:
    return Region(size, read=lambda o, c: bytes(c), write=lambda o, d: None)


# --------------------------------------------------------------------------- ioeventfds


async def test_region_io_fds_hand_the_emulators_eventfds_to_the_client() -> None:
    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={0: bar_region(0x1000)})
    doorbell, other = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        device.create_ioeventfd(0, doorbell, 0x10, 4)
        device.create_ioeventfd(0, doorbell, 0x14, 4, datamatch=7)
        device.create_ioeventfd(0, other, 0x20, 8)
        with pytest.raises(ValueError, match="ioeventfd at 0xffe"):
            device.create_ioeventfd(0, other, 0xFFE, 4)
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path, caps=Capabilities(max_msg_fds=8))
                full = IO_FDS.size + 3 * SUB.size
                # Too small an argsz: the size needed and the count, no fds (libvfio-user).
                got = await raw.call(Command.DEVICE_GET_REGION_IO_FDS, IO_FDS.pack(16, 0, 0, 0))
                assert IO_FDS.unpack(got.payload) == (full, 0, 0, 3) and got.fds == []
                got = await raw.call(Command.DEVICE_GET_REGION_IO_FDS, IO_FDS.pack(full, 0, 0, 0))
                assert not got.is_error and len(got.fds) == 2
                subs = [SUB.unpack_from(got.payload, IO_FDS.size + i * SUB.size) for i in range(3)]
                assert [(s[0], s[1], s[4], s[7]) for s in subs] == [
                    (0x10, 4, 0, 0),
                    (0x14, 4, 1, 7),
                    (0x20, 8, 0, 0),
                ]
                assert subs[0][2] == subs[1][2] != subs[2][2]
                # The VMM (KVM) signals the fd on a guest write; the emulator reads it.
                os.eventfd_write(got.fds[subs[0][2]], 1)
                os.eventfd_write(got.fds[subs[2][2]], 5)
                assert os.eventfd_read(doorbell) == 1 and os.eventfd_read(other) == 5
                # A region without ioeventfds: "none".
                got = await raw.call(Command.DEVICE_GET_REGION_IO_FDS, IO_FDS.pack(64, 0, 7, 0))
                assert IO_FDS.unpack(got.payload) == (16, 0, 7, 0)
                for fd in got.fds:
                    os.close(fd)
                raw.close()
    finally:
        os.close(doorbell)
        os.close(other)


async def test_region_io_fds_refuse_more_fds_than_the_client_takes() -> None:
    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={0: bar_region(0x1000)})
    fds = [os.eventfd(0) for _ in range(2)]
    try:
        for i, fd in enumerate(fds):
            device.create_ioeventfd(0, fd, 4 * i, 4)
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)  # max_msg_fds 1
                payload = IO_FDS.pack(IO_FDS.size + 2 * SUB.size, 0, 0, 0)
                assert await raw.errno_of(Command.DEVICE_GET_REGION_IO_FDS, payload) == errno.EINVAL
                raw.close()
    finally:
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------- mmap from an fd


async def test_region_memory_from_the_emulators_fd_and_offset() -> None:
    fd = os.memfd_create("emulator")
    os.ftruncate(fd, 4 * PAGE)
    os.pwrite(fd, b"bar four", 2 * PAGE)
    memory = FileMemory(fd, 2 * PAGE, offset=2 * PAGE)
    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={4: Region(2 * PAGE, memory=memory)})
    try:
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                assert await read(raw, 4, 0, 8) == b"bar four"  # served from the memory
                got = await raw.call(
                    Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(128, 0, 4, 0, 0, 0)
                )
                assert len(got.fds) == 1
                _, flags, _, _, size, offset = REGION_INFO.unpack_from(got.payload)
                assert flags & 0x4  # mmappable
                assert (size, offset) == (2 * PAGE, 2 * PAGE)
                with mmap.mmap(got.fds[0], PAGE, offset=offset) as client_view:
                    assert client_view[:8] == b"bar four"
                    client_view[8:12] = b"!!!!"
                assert memory.view[8:12] == b"!!!!"  # the emulator sees the client's write
                os.close(got.fds[0])
                raw.close()
    finally:
        memory.close()
        os.close(fd)


# --------------------------------------------------------------------------- quiesce


def dma_map(iova: int) -> bytes:
    return DMA_MAP.pack(DMA_MAP.size, 0x3, 0, iova, PAGE)


async def test_quiesce_holds_the_request_until_the_device_is_quiet() -> None:
    asked: list[str] = []
    wanted = trio.Event()

    def quiesce() -> bool:
        nonlocal wanted
        asked.append("quiesce")
        wanted.set()
        return False  # "later": the test says when, with device.quiesced()

    async def quiet_after_asked(errno_: int = 0) -> None:
        nonlocal wanted
        await wanted.wait()
        wanted = trio.Event()
        device.quiesced(errno_)

    device = VfioUserDevice(
        pci=PciConfig(0x1234, 1),
        regions={0: bar_region(PAGE)},
        quiesce=quiesce,
        reset=lambda reason: asked.append(reason.value),
    )
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            msg_id = await raw.send(Command.DMA_MAP, dma_map(0x10000))
            await wanted.wait()
            with trio.move_on_after(0.2):
                await raw.receive()
                pytest.fail("DMA_MAP answered before the device said it was quiet")
            assert asked == ["quiesce"] and device.dma.regions == []
            await quiet_after_asked()
            got = await raw.receive()
            assert got.msg_id == msg_id and not got.is_error and len(device.dma.regions) == 1
            async with trio.open_nursery() as nursery:  # reset: quiesce first, then reset
                nursery.start_soon(quiet_after_asked)
                assert await raw.errno_of(Command.DEVICE_RESET, b"") == 0
            assert asked == ["quiesce", "quiesce", "device-reset"]
            # The device fails to quiesce: its errno goes to the client, nothing unmapped.
            unmap = DMA_UNMAP.pack(DMA_UNMAP.size, 0, 0x10000, PAGE)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(quiet_after_asked, errno.EIO)
                assert await raw.errno_of(Command.DMA_UNMAP, unmap) == errno.EIO
            assert len(device.dma.regions) == 1
            raw.close()


async def test_quiesce_is_bounded() -> None:
    device = VfioUserDevice(
        pci=PciConfig(0x1234, 1),
        regions={0: bar_region(PAGE)},
        quiesce=lambda: False,
        quiesce_timeout=0.2,
    )
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            assert await raw.errno_of(Command.DMA_MAP, dma_map(0x10000)) == errno.EBUSY
            assert device.dma.regions == []
            # Region access never waits for a quiesce.
            assert await read(raw, 0, 0, 4) == bytes(4)
            raw.close()


# --------------------------------------------------------------------------- interrupts


def set_irqs(flags: int, index: int, start: int, count: int) -> bytes:
    return IRQ_SET.pack(IRQ_SET.size, flags, index, start, count)


async def test_trigger_enabled_uses_the_type_the_guest_enabled() -> None:
    states: list[tuple[str, int, int, bool]] = []
    device = VfioUserDevice(
        pci=PciConfig(0x1234, 1),
        regions={0: bar_region(PAGE)},
        irqs={IrqIndex.INTX: 1, IrqIndex.MSI: 2, IrqIndex.MSIX: 4},
        irq_state={
            IrqIndex.MSIX: lambda start, count, masked: states.append(
                ("msix", start, count, masked)
            ),
            IrqIndex.MSI: lambda start, count, masked: states.append(("msi", start, count, masked)),
        },
    )
    msi, msix = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                assert device.irqs.trigger_enabled(0) is None  # nothing wired
                msi_set = set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 1, 1)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, msi_set, [msi]) == 0
                assert device.irqs.trigger_enabled(1) == IrqIndex.MSI
                assert os.eventfd_read(msi) == 1
                msix_set = set_irqs(TRIGGER_EVENTFD, IrqIndex.MSIX, 3, 1)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, msix_set, [msix]) == 0
                assert device.irqs.trigger_enabled(3) == IrqIndex.MSIX
                assert os.eventfd_read(msix) == 1
                with pytest.raises(BlockingIOError):
                    os.eventfd_read(msi)
                mask = set_irqs(MASK_NONE, IrqIndex.MSIX, 2, 2)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, mask) == 0
                assert states == [("msix", 2, 2, True)]
                raw.close()
    finally:
        os.close(msi)
        os.close(msix)


# --------------------------------------------------------------------------- WRITE_MULTI


async def test_region_write_multi_applies_each_write_in_order() -> None:
    bar = bytearray(64)

    def bar_write(offset: int, data: memoryview) -> None:
        bar[offset : offset + len(data)] = data

    device = VfioUserDevice(
        pci=PciConfig(0x1234, 1),
        regions={0: Region(64, read=lambda o, c: bar[o : o + c], write=bar_write)},
    )
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = RawClient(await _connect(path))
            got = await raw.call(
                Command.VERSION, struct.pack("=HH", 0, 2) + b'{"capabilities":{}}\0'
            )
            caps = json.loads(got.payload[4:].rstrip(b"\0"))["capabilities"]
            assert caps["write_multiple"] is True
            writes = [(0, 4, b"abcd"), (8, 8, b"12345678"), (2, 2, b"XY")]
            body = struct.pack("=Q", len(writes)) + b"".join(
                MULTI_ONE.pack(offset, 0, count, data) for offset, count, data in writes
            )
            assert await raw.errno_of(Command.REGION_WRITE_MULTI, body) == 0
            assert bar[:16] == b"abXY" + bytes(4) + b"12345678"
            # Each write takes the REGION_WRITE rules: past the end stops the batch there.
            bad = (
                struct.pack("=Q", 2)
                + MULTI_ONE.pack(20, 0, 1, b"Z")
                + MULTI_ONE.pack(62, 0, 4, b"")
            )
            assert await raw.errno_of(Command.REGION_WRITE_MULTI, bad) == errno.EINVAL
            assert bar[20:21] == b"Z"
            too_long = struct.pack("=Q", 1) + MULTI_ONE.pack(0, 0, 9, b"")
            assert await raw.errno_of(Command.REGION_WRITE_MULTI, too_long) == errno.EINVAL
            empty = struct.pack("=Q", 0)
            assert await raw.errno_of(Command.REGION_WRITE_MULTI, empty) == errno.EINVAL
            raw.close()


async def _connect(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(path)
    return sock


# --------------------------------------------------------------------------- fast path


async def test_small_register_access_errors_match_the_full_path() -> None:
    def fail(offset: int, count: int) -> bytes:
        raise OSError(errno.ENODEV, "the register is gone")

    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={0: Region(PAGE, read=fail)})
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            assert await raw.errno_of(Command.REGION_READ, ACCESS.pack(0, 0, 4)) == errno.ENODEV
            assert await raw.errno_of(Command.REGION_READ, ACCESS.pack(0, 0, 4096)) == errno.ENODEV
            past = ACCESS.pack(PAGE - 2, 0, 4)
            assert await raw.errno_of(Command.REGION_READ, past) == errno.EINVAL
            assert (
                await raw.errno_of(Command.REGION_WRITE, ACCESS.pack(0, 0, 4) + b"1")
                == errno.EINVAL
            )
            assert (
                await raw.errno_of(Command.REGION_WRITE, ACCESS.pack(0, 0, 4) + b"1234")
                == errno.EINVAL
            )
            assert await read(raw, 7, 0, 4) == b"\x34\x12\x01\x00"
            raw.close()


# --------------------------------------------------------------------------- threads


def test_a_device_served_from_its_own_thread() -> None:
    """No trio in this test: the server runs in its thread, the VMM is a blocking client
    here, and another plain thread triggers interrupts and reads guest memory."""
    bar = bytearray(16)
    device = VfioUserDevice(
        pci=PciConfig(0x1234, 1),
        regions={0: Region(16, read=lambda o, c: bar[o : o + c])},
        irqs={IrqIndex.MSI: 1},
    )
    guest = bytes(range(256)) * 16
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
        path = os.path.join(tmp, "s")
        handle = start_vfio_user_thread(path, device)
        with pytest.raises(RuntimeError, match="failed to start"):
            start_vfio_user_thread(path, device)  # the path is taken
        try:
            vmm = SyncClient(path)
            bar[:4] = b"ping"
            got = vmm.call(Command.REGION_READ, ACCESS.pack(0, 0, 4))
            assert got.payload[ACCESS.size :] == b"ping"
            assert not vmm.call(Command.DMA_MAP, dma_map(0x10000)).is_error
            wire = set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 0, 1)
            assert not vmm.call(Command.DEVICE_SET_IRQS, wire, [efd]).is_error
            results: dict[str, object] = {}

            def emulator() -> None:
                results["irq"] = handle.trigger_enabled(0)
                results["dma"] = handle.dma_read(0x10000 + 16, 32)

            worker = threading.Thread(target=emulator)
            worker.start()
            request = vmm.receive()  # the server's DMA_READ, answered from "guest memory"
            assert request.command == Command.DMA_READ
            addr, count = struct.unpack("=QQ", request.payload)
            offset = addr - 0x10000
            vmm.reply(request, request.payload + guest[offset : offset + count])
            worker.join(10)
            assert results == {"irq": IrqIndex.MSI, "dma": guest[16:48]}
            assert os.eventfd_read(efd) == 1
            vmm.close()
        finally:
            handle.stop()
            os.close(efd)
        assert not os.path.exists(path)
        handle.stop()  # again: a no-op
        with pytest.raises(RuntimeError, match="not running"):
            handle.trigger(IrqIndex.MSI, 0)


# --------------------------------------------------------------------------- DMA replies


async def test_a_dma_reply_already_there_is_taken_by_the_requesting_task() -> None:
    """`Connection._take_reply` on a real socket pair: only the next message, only whole,
    only the reply it waits for; whatever follows stays in the socket for the connection's
    task (in order)."""
    ours, theirs = trio.socket.socketpair(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    conn = Connection(ours, VfioUserDevice(pci=PciConfig(0x1234, 1)))
    conn.idle = True
    waiter = _Pending(Command.DMA_READ)
    conn.pending[5] = waiter
    reply = HEADER.pack(5, Command.DMA_READ, 16 + 20, 0x1, 0) + bytes(16) + b"data"
    request = HEADER.pack(9, Command.DEVICE_RESET, 16, 0, 0)
    try:
        await theirs.send(reply[:30])  # not whole yet
        conn._take_reply(5, waiter)
        assert waiter.result is None
        await theirs.send(reply[30:] + request)
        conn._take_reply(6, _Pending(Command.DMA_READ))  # not the reply that one waits for
        conn._take_reply(5, waiter)
        assert waiter.result == bytes(16) + b"data" and conn.base == len(reply)
        assert conn.sock.recv(64) == request  # left for the connection's task
    finally:
        conn.sock.close()
        ours.close()
        theirs.close()


async def test_the_unmapping_at_disconnect_waits_for_quiet_too() -> None:
    events: list[str] = []
    unmapped = trio.Event()

    def quiesce() -> bool:
        events.append(f"quiesce with {len(device.dma.regions)} mapped")
        return True  # quiet at once

    def on_unmap(region: DmaRegion) -> None:
        events.append(f"unmap {region.iova:#x}")
        unmapped.set()

    device = VfioUserDevice(
        pci=PciConfig(0x1234, 1), regions={0: bar_region(PAGE)}, quiesce=quiesce
    )
    device.dma.on_unmap = on_unmap
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            assert await raw.errno_of(Command.DMA_MAP, dma_map(0x10000)) == 0
            raw.close()
            await unmapped.wait()
    assert events == ["quiesce with 0 mapped", "quiesce with 1 mapped", "unmap 0x10000"]
