"""libvfio-user's device features in the server library, driven over real UNIX sockets
through the library's VMM-side client (`vfiomig.vfio_user.client`, the ``vfio_user``
fixture of `vfiomig.testing.vfio_user`): ioeventfds, mmap areas from the emulator's fd,
quiesce, the enabled interrupt type, per-type IRQ state callbacks, REGION_WRITE_MULTI,
the fast path of register accesses and a server in its own thread. A few tests send raw
bytes (`tests.vfio_user_raw`) where the point is a malformed message the client would
never send, or the server's internals (the config-space features are in
test_vfio_user_pci_features)."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import tempfile
from collections.abc import Awaitable

import pytest
import trio
import trio.testing

from tests.vfio_user_raw import RawClient, serving
from vfiomig.testing.vfio_user import VfioUserHarness
from vfiomig.vfio_user import (
    DmaRegion,
    FileMemory,
    IrqIndex,
    PciConfig,
    Region,
    VfioUserCommandError,
    VfioUserDevice,
    open_vfio_user_client,
    start_vfio_user_thread,
)
from vfiomig.vfio_user._header import HEADER, Command
from vfiomig.vfio_user.client import GuestRegion
from vfiomig.vfio_user.server._connection import Connection
from vfiomig.vfio_user.server._server_requests import (
    BRIEF_MISSES,
    BRIEF_PROBE,
    BriefWait,
    _Pending,
)

PAGE = mmap.PAGESIZE
ACCESS = struct.Struct("=QII")
MULTI_ONE = struct.Struct("=QII8s")


def bar_region(size: int) -> Region:
    return Region(size, read=lambda o, c: bytes(c), write=lambda o, d: None)


async def refused(call: Awaitable[object]) -> int | None:
    """The errno of a client call the server refuses."""
    with pytest.raises(VfioUserCommandError) as info:
        await call
    return info.value.errno


# --------------------------------------------------------------------------- ioeventfds


async def test_region_io_fds_hand_the_emulators_eventfds_to_the_client(
    vfio_user: VfioUserHarness,
) -> None:
    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={0: bar_region(0x1000)})
    doorbell, other = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        device.create_ioeventfd(0, doorbell, 0x10, 4)
        device.create_ioeventfd(0, doorbell, 0x14, 4, datamatch=7)
        device.create_ioeventfd(0, other, 0x20, 8)
        with pytest.raises(ValueError, match="ioeventfd at 0xffe"):
            device.create_ioeventfd(0, other, 0xFFE, 4)
        path = await vfio_user.serve(device)
        async with await open_vfio_user_client(path, max_msg_fds=8) as client:
            # Asked twice, as libvfio-user's client does: the argsz it needs, then them.
            subs = await client.region_io_fds(0)
            assert [(s.offset, s.size, s.datamatch) for s in subs] == [
                (0x10, 4, None),
                (0x14, 4, 7),
                (0x20, 8, None),
            ]
            assert subs[0].fd == subs[1].fd != subs[2].fd  # one fd each, as the device made
            # The VMM (KVM) signals the fd on a guest write; the emulator reads it.
            os.eventfd_write(subs[0].fd, 1)
            os.eventfd_write(subs[2].fd, 5)
            assert os.eventfd_read(doorbell) == 1 and os.eventfd_read(other) == 5
            assert await client.region_io_fds(7) == []  # a region without ioeventfds
    finally:
        os.close(doorbell)
        os.close(other)


async def test_region_io_fds_refuse_more_fds_than_the_client_takes(
    vfio_user: VfioUserHarness,
) -> None:
    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={0: bar_region(0x1000)})
    fds = [os.eventfd(0) for _ in range(2)]
    try:
        for i, fd in enumerate(fds):
            device.create_ioeventfd(0, fd, 4 * i, 4)
        client = await vfio_user.attach(device)  # max_msg_fds 1
        assert await refused(client.region_io_fds(0)) == errno.EINVAL
    finally:
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------- mmap from an fd


async def test_region_memory_from_the_emulators_fd_and_offset(vfio_user: VfioUserHarness) -> None:
    fd = os.memfd_create("emulator")
    os.ftruncate(fd, 4 * PAGE)
    os.pwrite(fd, b"bar four", 2 * PAGE)
    memory = FileMemory(fd, 2 * PAGE, offset=2 * PAGE)
    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={4: Region(2 * PAGE, memory=memory)})
    try:
        client = await vfio_user.attach(device)
        assert await client.region_read(4, 0, 8) == b"bar four"  # served from the memory
        region = await client.region(4)
        assert region.mappable and (region.size, region.offset) == (2 * PAGE, 2 * PAGE)
        mapped = await client.map_region(4)
        view = mapped.view(0, 12)
        assert view[:8] == b"bar four"
        view[8:12] = b"!!!!"
        view.release()
        assert memory.view[8:12] == b"!!!!"  # the emulator sees the client's write
        await vfio_user.detach(client)
    finally:
        memory.close()
        os.close(fd)


# --------------------------------------------------------------------------- quiesce


async def test_quiesce_holds_the_request_until_the_device_is_quiet(
    vfio_user: VfioUserHarness,
) -> None:
    asked: list[str] = []
    wanted = trio.Event()

    def quiesce() -> bool:
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
    with trio.fail_after(10):  # the test's own waits (the client's are bounded too)
        client = await vfio_user.attach(device)
        mapped: list[GuestRegion] = []

        async def map_it() -> None:
            mapped.append(await client.map_dma(0x10000, PAGE))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(map_it)
            await wanted.wait()
            await trio.testing.wait_all_tasks_blocked()  # the server holds the reply back
            assert mapped == [] and asked == ["quiesce"] and device.dma.regions == []
            await quiet_after_asked()
        assert len(mapped) == 1 and len(device.dma.regions) == 1
        async with trio.open_nursery() as nursery:  # reset: quiesce first, then reset
            nursery.start_soon(quiet_after_asked)
            await client.reset()
        assert asked == ["quiesce", "quiesce", "device-reset"]
        # The device fails to quiesce: its errno goes to the client, nothing unmapped.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(quiet_after_asked, errno.EIO)
            assert await refused(client.unmap_dma(mapped[0])) == errno.EIO
        assert len(device.dma.regions) == 1


async def test_quiesce_is_bounded(vfio_user: VfioUserHarness) -> None:
    device = VfioUserDevice(
        pci=PciConfig(0x1234, 1),
        regions={0: bar_region(PAGE)},
        quiesce=lambda: False,
        quiesce_timeout=0.2,
    )
    client = await vfio_user.attach(device)
    assert await refused(client.map_dma(0x10000, PAGE)) == errno.EBUSY
    assert device.dma.regions == []
    assert await client.region_read(0, 0, 4) == bytes(4)  # region access never waits


async def test_the_unmapping_at_disconnect_waits_for_quiet_too(vfio_user: VfioUserHarness) -> None:
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
    client = await vfio_user.attach(device)
    await client.map_dma(0x10000, PAGE)
    await vfio_user.detach(client)
    with trio.fail_after(10):
        await unmapped.wait()
    assert events == ["quiesce with 0 mapped", "quiesce with 1 mapped", "unmap 0x10000"]


# --------------------------------------------------------------------------- interrupts


async def test_trigger_enabled_uses_the_type_the_guest_enabled(vfio_user: VfioUserHarness) -> None:
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
    client = await vfio_user.attach(device)
    assert device.irqs.trigger_enabled(0) is None  # nothing wired
    [msi] = await client.set_irq_eventfds(IrqIndex.MSI, 1, 1)
    assert device.irqs.trigger_enabled(1) == IrqIndex.MSI
    assert await msi.wait() == 1
    [msix] = await client.set_irq_eventfds(IrqIndex.MSIX, 3, 1)
    assert device.irqs.trigger_enabled(3) == IrqIndex.MSIX
    assert await msix.wait() == 1
    assert msi.take() == 0  # MSI-X enabled: it, not MSI, is signalled
    await client.mask_irqs(IrqIndex.MSIX, 2, 2)
    await client.mask_irqs(IrqIndex.MSI, 0, 1, masked=False)
    assert states == [("msix", 2, 2, True), ("msi", 0, 1, False)]


# --------------------------------------------------------------------------- WRITE_MULTI


def bar64() -> tuple[bytearray, VfioUserDevice]:
    bar = bytearray(64)

    def bar_write(offset: int, data: memoryview) -> None:
        bar[offset : offset + len(data)] = data

    region = Region(64, read=lambda o, c: bar[o : o + c], write=bar_write)
    return bar, VfioUserDevice(pci=PciConfig(0x1234, 1), regions={0: region})


async def test_region_write_multi_applies_each_write_in_order(vfio_user: VfioUserHarness) -> None:
    bar, device = bar64()
    client = await vfio_user.attach(device)
    assert client.server_capabilities.write_multiple is True
    await client.region_write_multi([(0, 0, b"abcd"), (0, 8, b"12345678"), (0, 2, b"XY")])
    assert bar[:16] == b"abXY" + bytes(4) + b"12345678"
    # Each write takes the REGION_WRITE rules: past the end stops the batch there.
    bad = [(0, 20, b"Z"), (0, 62, bytes(4)), (0, 30, b"never")]
    assert await refused(client.region_write_multi(bad)) == errno.EINVAL
    assert bar[20:21] == b"Z" and bar[30:35] == bytes(5)
    with pytest.raises(ValueError, match="1 to 8"):
        await client.region_write_multi([(0, 0, b"123456789")])  # refused before sending


async def test_region_write_multi_refuses_malformed_batches() -> None:
    """Raw bytes: counts the client refuses to send (a write of 9 bytes, an empty batch)."""
    _, device = bar64()
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            too_long = struct.pack("=Q", 1) + MULTI_ONE.pack(0, 0, 9, b"")
            assert await raw.errno_of(Command.REGION_WRITE_MULTI, too_long) == errno.EINVAL
            empty = struct.pack("=Q", 0)
            assert await raw.errno_of(Command.REGION_WRITE_MULTI, empty) == errno.EINVAL
            raw.close()


# --------------------------------------------------------------------------- fast path


async def test_small_register_access_errors_match_the_full_path(
    vfio_user: VfioUserHarness,
) -> None:
    def fail(offset: int, count: int) -> bytes:
        raise OSError(errno.ENODEV, "the register is gone")

    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={0: Region(PAGE, read=fail)})
    client = await vfio_user.attach(device)
    assert await refused(client.region_read(0, 0, 4)) == errno.ENODEV  # the fast path
    assert await refused(client.region_read(0, 0, 4096)) == errno.ENODEV  # the full path
    assert await refused(client.region_read(0, PAGE - 2, 4)) == errno.EINVAL
    assert await refused(client.region_write(0, 0, b"1234")) == errno.EINVAL  # no write
    assert await client.region_read(7, 0, 4) == b"\x34\x12\x01\x00"


async def test_a_small_write_whose_data_does_not_match_its_count_is_refused() -> None:
    """Raw bytes: a REGION_WRITE of count 4 carrying 1 byte (the client cannot send it)."""
    device = VfioUserDevice(pci=PciConfig(0x1234, 1), regions={0: bar_region(PAGE)})
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            short = ACCESS.pack(0, 0, 4) + b"1"
            assert await raw.errno_of(Command.REGION_WRITE, short) == errno.EINVAL
            raw.close()


async def test_brief_waits_give_way_and_stop_when_they_do_not_pay() -> None:
    """`BriefWait` on a real socket pair: it sees bytes already there, never blocks while
    a task is ready to run, and after `BRIEF_MISSES` empty waits tries only one in
    `BRIEF_PROBE` until one sees the client again."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    brief = BriefWait()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)  # runnable until this task checkpoints
            assert not brief(ours) and brief.misses == 0  # gave way, counted no miss
            await trio.lowlevel.checkpoint()
        for i in range(BRIEF_MISSES):
            assert not brief(ours) and brief.misses == i + 1  # nothing came
        assert not brief.active
        theirs.send(b"x")
        assert [brief(ours) for _ in range(BRIEF_PROBE)] == [False] * (BRIEF_PROBE - 1) + [True]
        assert brief.active and brief.misses == 0  # the probe saw the client again
        assert brief(ours)  # bytes already there
    finally:
        ours.close()
        theirs.close()


# --------------------------------------------------------------------------- threads


def test_a_device_served_from_its_own_thread() -> None:
    """The server runs in its thread with its own trio; a plain thread triggers interrupts
    and reads guest memory through the handle while the VMM (the library's client, in
    this thread's trio run) answers the DMA_READ from its guest memory."""
    bar = bytearray(16)
    device = VfioUserDevice(
        pci=PciConfig(0x1234, 1),
        regions={0: Region(16, read=lambda o, c: bar[o : o + c])},
        irqs={IrqIndex.MSI: 1},
    )
    guest = bytes(range(256)) * 16
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
        path = os.path.join(tmp, "s")
        handle = start_vfio_user_thread(path, device)
        with pytest.raises(RuntimeError, match="failed to start"):
            start_vfio_user_thread(path, device)  # the path is taken

        def emulator() -> None:  # a thread of a program that is not written on trio
            results["irq"] = handle.trigger_enabled(0)
            results["dma"] = handle.dma_read(0x10000 + 16, 32)

        async def vmm() -> None:
            with trio.fail_after(10):
                async with await open_vfio_user_client(path) as client, trio.open_nursery() as n:
                    bar[:4] = b"ping"
                    assert await client.region_read(0, 0, 4) == b"ping"
                    await client.map_dma(0x10000, len(guest), with_fd=False)
                    client.guest.write(0x10000, guest)
                    [irq] = await client.set_irq_eventfds(IrqIndex.MSI)
                    await n.start(client.serve_requests)  # answers the DMA_READ
                    await trio.to_thread.run_sync(emulator)
                    assert await irq.wait() == 1
                    assert client.requests_served == 1
                    n.cancel_scope.cancel()

        try:
            trio.run(vmm)
        finally:
            handle.stop()
        assert results == {"irq": IrqIndex.MSI, "dma": guest[16:48]}
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
