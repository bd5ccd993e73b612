"""A hostile VMM against the vfio-user server, over real UNIX sockets (issue 24's cases).

Each case must leave the server answering the same client's next request, and the next
client once this one goes, with the server's memory within the bound the guide states
(docs/vfio-user-emulators.md, "Limits and safety").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import importlib.util
import mmap
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fuzz.vfio_user_server import sample_device
from tests.vfio_user_raw import RawClient, open_fds, serving
from vfiomig import SinkError
from vfiomig.vfio_user import (
    IrqIndex,
    SharedMemory,
    VfioUserDevice,
    open_vfio_user_client,
    serve_vfio_user,
)
from vfiomig.vfio_user._header import HEADER, Command
from vfiomig.vfio_user._layouts import (
    DMA_ACCESS,
    DMA_MAP,
    IRQ_SET,
    LOGGING_CONTROL,
    LOGGING_REPORT,
)
from vfiomig.vfio_user._migration_bodies import DeviceFeature
from vfiomig.vfio_user.server import _eventfds
from vfiomig.vfio_user.server._dma import MAX_REGION_SIZE
from vfiomig.vfio_user.server._eventfds import EVENTFD_MAX

PAGE = mmap.PAGESIZE
TIB = 1 << 40
RW = 0x3
TRIGGER_EVENTFD = 0x20 | 0x4
TRIGGER_NONE = 0x20 | 0x1
ACCESS = struct.Struct("=QII")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vfio_user_sample_server.py"


def make_device(**kwargs: Any) -> VfioUserDevice:
    return sample_device(SharedMemory(2 * PAGE), max_data_xfer_size=64 * 1024, **kwargs)


def set_irqs(flags: int, index: int, start: int, count: int) -> bytes:
    return IRQ_SET.pack(IRQ_SET.size, flags, index, start, count)


def dma_map(addr: int, size: int) -> bytes:
    return DMA_MAP.pack(DMA_MAP.size, RW, 0, addr, size)


def logging_start(pgsize: int) -> bytes:
    ctl = LOGGING_CONTROL.pack(pgsize, 0, 0)
    return DeviceFeature(8 + len(ctl), 0x20000 | 6, ctl).pack()


def logging_report(iova: int, length: int, pgsize: int, bitmap: int) -> bytes:
    return DeviceFeature(
        8 + LOGGING_REPORT.size + bitmap, 0x10000 | 8, LOGGING_REPORT.pack(iova, length, pgsize)
    ).pack()


def rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def still_served(raw: RawClient) -> None:
    got = await raw.call(Command.REGION_READ, ACCESS.pack(0, 0, 4))
    assert not got.is_error, got


# --------------------------------------------------------------------------- interrupts


async def test_a_full_pipe_or_a_socket_is_no_eventfd() -> None:
    """The write end of a full pipe as an "eventfd": a blocking write there would stop the
    server until the client reads. It is refused (EINVAL), and nothing leaks."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    while True:
        try:
            os.write(write_end, bytes(65536))
        except BlockingIOError:
            break
    os.set_blocking(write_end, True)
    left, right = socket.socketpair()
    device = make_device()
    try:
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                before = open_fds()
                for fd in (write_end, left.fileno()):
                    request = set_irqs(TRIGGER_EVENTFD, IrqIndex.INTX, 0, 1)
                    assert (
                        await raw.errno_of(Command.DEVICE_SET_IRQS, request, [fd]) == errno.EINVAL
                    )
                assert open_fds() == before
                assert device.irqs.eventfd(IrqIndex.INTX, 0) is None
                assert device.irqs.trigger(IrqIndex.INTX, 0, strict=False) is False
                await still_served(raw)
                raw.close()
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        left.close()
        right.close()


@pytest.mark.parametrize("blocking", [True, False])
async def test_a_full_eventfd_never_stalls_the_server(blocking: bool) -> None:
    """An eventfd whose count is at the maximum: a write of 1 would block (libvfio-user's
    sample client makes blocking eventfds; the flag is the client's, shared). Signalling
    it returns at once, the client's requests are answered, and once the client reads
    its eventfd the interrupts reach it again."""
    efd = os.eventfd(0, 0 if blocking else os.EFD_NONBLOCK)
    os.write(efd, EVENTFD_MAX.to_bytes(8, "little"))
    device = make_device()
    try:
        with trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                wire = set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 0, 1)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, wire, [efd]) == 0
                assert bool(fcntl.fcntl(efd, fcntl.F_GETFL) & os.O_NONBLOCK) is not blocking
                for _ in range(3):  # from a request (SET_IRQS DATA_NONE) and the emulator
                    fire = set_irqs(TRIGGER_NONE, IrqIndex.MSI, 0, 1)
                    assert await raw.errno_of(Command.DEVICE_SET_IRQS, fire) == 0
                    device.irqs.trigger(IrqIndex.MSI, 0)
                await still_served(raw)
                assert int.from_bytes(os.read(efd, 8), "little") == EVENTFD_MAX
                device.irqs.trigger(IrqIndex.MSI, 0)
                assert int.from_bytes(os.read(efd, 8), "little") == 1
                raw.close()
    finally:
        os.close(efd)


def _full_blocking_eventfds(count: int) -> list[int]:
    efds = [os.eventfd(0, 0) for _ in range(count)]
    for efd in efds:
        os.write(efd, EVENTFD_MAX.to_bytes(8, "little"))
    return efds


@contextlib.contextmanager
def _rescued(efds: list[int], after: float) -> Iterator[None]:
    """Read each eventfd once, ``after`` seconds from now, unless the test is done first: a
    server that does write a full blocking eventfd from its loop is stuck until then, so a
    regression fails the test's timing assertion instead of hanging the suite."""
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(after):
            for efd in efds:
                os.set_blocking(efd, False)
                with contextlib.suppress(BlockingIOError):
                    os.read(efd, 8)

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


async def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(10):
        while not predicate():  # noqa: ASYNC110 - state of other threads, no trio event
            await trio.sleep(0.01)
        return
    raise AssertionError(f"waited 10 s for {what}")


async def test_an_eventfd_filled_after_the_check_never_stalls_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race a count check cannot close: the client fills its blocking eventfd between
    the server's look at /proc fdinfo and its write (forced here: the check is told the
    count is 0). The write goes to a signaller thread, so the trigger returns at once and
    the client is served while it holds the eventfd full; a second trigger is the same
    pending interrupt (one write in flight); once the client reads, the write lands, and
    the fds the signaller held are all closed again."""
    monkeypatch.setattr(_eventfds, "eventfd_state", lambda fd: (0, None))
    (efd,) = _full_blocking_eventfds(1)
    device = make_device()
    try:
        with _rescued([efd], after=8), trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                wire = set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 0, 1)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, wire, [efd]) == 0
                before = open_fds()
                started = time.monotonic()
                assert device.irqs.trigger(IrqIndex.MSI, 0) is True
                assert device.irqs.trigger(IrqIndex.MSI, 0) is True
                await still_served(raw)
                assert time.monotonic() - started < 2, "the trigger waited for the client"
                assert _eventfds.SIGNALLERS.busy() == 1
                assert int.from_bytes(os.read(efd, 8), "little") == EVENTFD_MAX
                assert int.from_bytes(os.read(efd, 8), "little") == 1
                await _wait_until(lambda: _eventfds.SIGNALLERS.busy() == 0, "the write")
                assert open_fds() == before
                raw.close()
    finally:
        os.close(efd)


async def test_stuck_signallers_are_capped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that keep their blocking eventfds full hold at most the cap of signaller
    threads: past it an interrupt on another blocking eventfd is refused (False, one
    warning), the server serves on, and a client that goes away while its write is stuck
    leaves nothing behind once the eventfd is read."""
    monkeypatch.setattr(_eventfds, "eventfd_state", lambda fd: (0, None))
    monkeypatch.setattr(_eventfds.SIGNALLERS, "limit", 2)
    efds = _full_blocking_eventfds(3)
    device = make_device()
    try:
        with _rescued(efds, after=8), trio.fail_after(10):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                wire = set_irqs(TRIGGER_EVENTFD, IrqIndex.MSI, 0, 3)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, wire, efds) == 0
                assert device.irqs.trigger(IrqIndex.MSI, 0) is True
                assert device.irqs.trigger(IrqIndex.MSI, 1) is True
                await _wait_until(lambda: _eventfds.SIGNALLERS.threads() == 2, "two threads")
                assert device.irqs.trigger(IrqIndex.MSI, 2) is False
                assert device.irqs.trigger(IrqIndex.MSI, 2) is False
                stuck = [r for r in caplog.records if "stuck on clients" in r.getMessage()]
                assert len(stuck) == 1, stuck
                assert _eventfds.SIGNALLERS.threads() == 2
                await still_served(raw)
                raw.close()
                # the client's fds are gone from the server; its writes are still stuck
                await _wait_until(lambda: device.irqs.eventfd(IrqIndex.MSI, 0) is None, "reset")
                assert _eventfds.SIGNALLERS.busy() == 2
                held = open_fds(settled=False)  # two writes are stuck on purpose
                for efd in efds[:2]:
                    assert int.from_bytes(os.read(efd, 8), "little") == EVENTFD_MAX
                    assert int.from_bytes(os.read(efd, 8), "little") == 1
                await _wait_until(lambda: _eventfds.SIGNALLERS.busy() == 0, "the writes")
                assert int.from_bytes(os.read(efds[2], 8), "little") == EVENTFD_MAX
                assert open_fds() == held - 2, "the signallers' copies were not closed"
    finally:
        for efd in efds:
            os.close(efd)


# --------------------------------------------------------------------------- dirty logging


async def test_logging_report_over_8_tib_in_1_tib_pages() -> None:
    """An 8 TiB region mapped with a (sparse) memfd, logging in 4 KiB pages, a report in
    1 TiB pages: answered at once with the pages the emulator dirtied, whose bits are
    the only memory the log takes."""
    fd = os.memfd_create("guest")
    os.ftruncate(fd, MAX_REGION_SIZE)
    device = make_device()
    iova = 1 << 44
    try:
        with trio.fail_after(30):
            async with serving(device) as path:
                raw = await RawClient.connect(path)
                assert (
                    await raw.errno_of(Command.DMA_MAP, dma_map(iova, MAX_REGION_SIZE), [fd]) == 0
                )
                assert await raw.errno_of(Command.DEVICE_FEATURE, logging_start(PAGE)) == 0
                (region,) = device.dma.regions
                assert region.dirty is not None and region.dirty.nbytes == 0
                dma = device.dma
                dma.mark_dirty(dma.translate(iova + 3 * TIB + 5 * PAGE, 3 * PAGE, write=True))
                dma.mark_dirty(dma.translate(iova + 6 * TIB, 1 << 30, write=True))  # 1 GiB
                assert region.dirty.nbytes <= 3 * 32 * 1024
                started = time.monotonic()
                report = logging_report(iova, MAX_REGION_SIZE, TIB, 8)
                got = await raw.call(Command.DEVICE_FEATURE, report)
                elapsed = time.monotonic() - started
                assert not got.is_error, got
                assert got.payload[8 + LOGGING_REPORT.size :] == bytes([0b01001000]) + bytes(7)
                assert elapsed < 5, elapsed  # bit by bit, this took hours
                got = await raw.call(Command.DEVICE_FEATURE, report)
                assert got.payload[8 + LOGGING_REPORT.size :] == bytes(8)  # reported: clean
                assert region.dirty.nbytes == 0
                await still_served(raw)
                raw.close()
    finally:
        os.close(fd)


async def test_logging_start_over_64_regions_without_fds_allocates_nothing() -> None:
    """64 regions of 8 TiB mapped without fds, then DMA_LOGGING_START in 4 KiB pages: 80
    bytes of request used to allocate 256 MiB per region (16 GiB). The server never
    writes such regions, so they get no log at all; reports over them are EINVAL, as in
    libvfio-user."""
    device = make_device(max_dma_regions=64)
    with trio.fail_after(30):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            for i in range(64):
                mapped = dma_map(i * MAX_REGION_SIZE, MAX_REGION_SIZE)
                assert await raw.errno_of(Command.DMA_MAP, mapped) == 0
            before = rss()
            assert await raw.errno_of(Command.DEVICE_FEATURE, logging_start(PAGE)) == 0
            assert rss() - before < 64 << 20
            assert all(region.dirty is None for region in device.dma.regions)
            report = logging_report(0, MAX_REGION_SIZE, TIB, 8)
            assert await raw.errno_of(Command.DEVICE_FEATURE, report) == errno.EINVAL
            await still_served(raw)
            raw.close()


# --------------------------------------------------------------------------- DMA replies


@pytest.mark.parametrize(
    "reply",
    ["wrong address", "wrong count", "short", "long", "error"],
)
async def test_a_bad_dma_reply_fails_that_request_only(reply: str) -> None:
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            assert await raw.errno_of(Command.DMA_MAP, dma_map(0x10000, PAGE)) == 0
            outcome: list[object] = []

            async def emulator() -> None:
                sgs = device.dma.translate(0x10000, 64)
                try:
                    outcome.append(await device.dma.read(sgs))
                except OSError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(emulator)
                req = await raw.receive()
                assert req.command == Command.DMA_READ
                addr, count = DMA_ACCESS.unpack(req.payload)
                data = bytes(count)
                answer = {
                    "wrong address": DMA_ACCESS.pack(addr + PAGE, count) + data,
                    "wrong count": DMA_ACCESS.pack(addr, count - 1) + data[:-1],
                    "short": DMA_ACCESS.pack(addr, count) + data[:-1],
                    "long": DMA_ACCESS.pack(addr, count) + data + b"x",
                    "error": b"",
                }[reply]
                await raw.reply(req, answer, error=errno.EFAULT if reply == "error" else 0)
            (exc,) = outcome
            assert isinstance(exc, OSError)
            assert exc.errno == (errno.EFAULT if reply == "error" else errno.EIO)
            await still_served(raw)
            raw.close()


def load_sample_server() -> Any:
    spec = importlib.util.spec_from_file_location("vfio_user_sample_server", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_sample_servers_timer_survives_a_bad_dma_reply() -> None:
    """The timer fires, the device DMAs through messages, the client answers with the
    wrong address: that DMA fails (logged), the device goes on and fires again."""
    sample = load_sample_server().SampleServer()
    guest = os.memfd_create("guest")
    os.ftruncate(guest, 2 * PAGE)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with tempfile.TemporaryDirectory(prefix="vuh", dir="/tmp") as tmp, trio.fail_after(20):
            path = os.path.join(tmp, "s")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample.run_timer)
                await nursery.start(serve_vfio_user, path, sample.device)
                raw = await RawClient.connect(path)
                assert await raw.errno_of(Command.DMA_MAP, dma_map(0, PAGE)) == 0  # messages
                mapped = DMA_MAP.pack(DMA_MAP.size, RW, PAGE, PAGE, PAGE)
                assert await raw.errno_of(Command.DMA_MAP, mapped, [guest]) == 0  # direct
                wire = set_irqs(TRIGGER_EVENTFD, IrqIndex.INTX, 0, 1)
                assert await raw.errno_of(Command.DEVICE_SET_IRQS, wire, [efd]) == 0
                for round_ in range(2):
                    now = struct.pack("=q", int(time.time()) - 1)  # fires at once
                    assert await raw.errno_of(Command.REGION_WRITE, ACCESS.pack(0, 0, 8) + now) == 0
                    req = await raw.receive()  # the first DMA_WRITE of slot 0
                    assert req.command == Command.DMA_WRITE, req
                    addr, count = DMA_ACCESS.unpack_from(req.payload)
                    await raw.reply(req, DMA_ACCESS.pack(addr + 8, count))  # the wrong address
                    got = await raw.call(Command.REGION_READ, ACCESS.pack(0, 0, 8))
                    assert not got.is_error, got
                    assert int.from_bytes(os.read(efd, 8), "little") == 1, round_
                raw.close()
                nursery.cancel_scope.cancel()
    finally:
        os.close(guest)
        os.close(efd)


# --------------------------------------------------------------------------- connections


async def test_the_next_client_is_served_soon_after_a_flooding_one_leaves() -> None:
    """The first client pipelines large reads without reading a reply (the server waits
    for room in the socket) and hangs up: the next one is answered within a second."""
    device = make_device()
    with trio.fail_after(20):
        async with serving(device) as path:
            first = await RawClient.connect(path)
            read = HEADER.pack(0, Command.REGION_READ, 32, 0, 0) + ACCESS.pack(0, 2, 2 * PAGE)
            flood = socket.socket(fileno=os.dup(first.sock.fileno()))
            flood.setblocking(False)
            sent = 0
            with flood:
                try:  # BAR2 is shared memory: 8 KiB per reply, none read
                    while sent < 64 << 20:
                        sent += flood.send(read * 256)
                except BlockingIOError:
                    pass  # both directions are full: the server waits to send
            first.close()
            assert sent > 64 * 1024
            gone = trio.current_time()
            second = await RawClient.connect(path)  # VERSION answered
            await still_served(second)
            elapsed = trio.current_time() - gone
            assert elapsed < 1.0, elapsed
            second.close()


async def test_a_busy_server_answers_ebusy() -> None:
    """libvfio-user and this library serve one client at a time: a second client's first
    message gets EBUSY (not a broken pipe), so it can say the server is busy."""
    device = make_device()
    with trio.fail_after(10):
        async with serving(device) as path:
            first = await RawClient.connect(path)
            second = await RawClient.connect(path, version=False)
            got = await second.call(Command.VERSION, b"\0" * 4)
            assert got.is_error and got.errno == errno.EBUSY
            with pytest.raises(EOFError):
                await second.receive()
            second.close()
            # The library's client says so in words, not as a broken pipe.
            with pytest.raises(SinkError, match="is serving another client") as caught:
                await open_vfio_user_client(path)
            assert caught.value.errno == errno.EBUSY
            await still_served(first)
            first.close()


async def test_a_stale_socket_is_replaced_a_live_one_is_not() -> None:
    device, other = make_device(), make_device()
    with tempfile.TemporaryDirectory(prefix="vuh", dir="/tmp") as tmp, trio.fail_after(10):
        path = os.path.join(tmp, "c.sock")
        crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        crashed.bind(path)  # a server that died: its file stays, nothing listens
        crashed.close()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_vfio_user, path, device)
            raw = await RawClient.connect(path)
            await still_served(raw)
            raw.close()
            with pytest.raises(OSError, match="a server is listening there") as exc:
                await serve_vfio_user(path, other)
            assert exc.value.errno == errno.EADDRINUSE
            nursery.cancel_scope.cancel()
        await trio.Path(path).write_text("not a socket")
        with pytest.raises(FileExistsError, match="not a socket"):
            await serve_vfio_user(path, other)
        assert await trio.Path(path).read_text() == "not a socket"
        assert [name for name in os.listdir(tmp) if name.startswith(".vu")] == []


async def test_a_probe_is_not_the_once_client() -> None:
    """Checking whether a path is alive connects to it: a ``once`` server does not end
    for a connection that never said anything."""
    device, other = make_device(), make_device()
    with tempfile.TemporaryDirectory(prefix="vuh", dir="/tmp") as tmp, trio.fail_after(10):
        path = os.path.join(tmp, "c.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_vfio_user, path, device, once=True))
            with pytest.raises(OSError, match="a server is listening there"):
                await serve_vfio_user(path, other)  # probes the live server
            raw = await RawClient.connect(path)
            await still_served(raw)
            raw.close()
        assert not await trio.Path(path).exists()  # the once server ended after its real client
