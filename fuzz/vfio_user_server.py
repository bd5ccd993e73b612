"""The ``vfio_user_server`` fuzz target: a whole device's request handlers, with real fds.

An input is a seed byte, then records ``[command u8][fds u8][length u8][payload]``:
``fds`` asks for ``fds & 3`` fds of the kind ``fds >> 2 & 7`` (eventfd, memfd of two
pages, the read end of a pipe, a memfd of one page; and what a hostile VMM hands over: a
blocking eventfd already full, the write end of a full pipe, a socket, a sparse 8 TiB
memfd) to ride with the request, as SCM_RIGHTS would bring them. Every request must end
in a reply or an errno (``OSError`` / ``CloseConnection``), never another exception; a
reply must fit in a message. After each request the emulator dirties the first page of
every region mapped into it and raises every interrupt vector: that must never block (a
full eventfd, a pipe that got through), and the dirty logs must hold no more than those
pages' chunks (logging over fd-less or huge regions allocates nothing up front). Once
the client is gone (``disconnected``) every fd the device kept must be back and the
process must have exactly the fds it had before: none leaked, none closed twice.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from vfiomig.vfio_user import (
    BarDevice,
    IrqIndex,
    PciConfig,
    Region,
    SharedMemory,
    VfioUserDevice,
    msi_cap,
    msix_cap,
    pcie_cap,
    pm_cap,
    vendor_cap,
)
from vfiomig.vfio_user._header import Command
from vfiomig.vfio_user.server._dirty import CHUNK_BYTES
from vfiomig.vfio_user.server._eventfds import EVENTFD_MAX, SIGNALLERS
from vfiomig.vfio_user.server._handlers import handle
from vfiomig.vfio_user.server._session import CloseConnection, Session

PAGE = 4096
_COMMANDS = [*Command, 0, 14, 99]


class FuzzBug(AssertionError):
    """A target found behaviour that breaks its contract."""


def sample_device(memory: SharedMemory, **kwargs: Any) -> VfioUserDevice:
    """A device with a bit of everything (also the integration tests' device): a PCI
    Express function with PM, MSI, MSI-X, PCIe and vendor capabilities, a 256-byte BAR0
    kept in a bytearray, BAR2 on ``memory`` (its second page mmappable), every IRQ index
    and `BarDevice` migration. ``kwargs`` go to `VfioUserDevice`."""
    bar0 = bytearray(0x100)

    def write(offset: int, data: memoryview) -> None:
        bar0[offset : offset + len(data)] = data

    caps = [pm_cap(), msi_cap(4), msix_cap(8, 2, 0, 2, 0x800), pcie_cap(), vendor_cap(b"vfiomig")]
    pci = PciConfig(0x1AF4, 0x10FF, 0x1234, 0x5678, class_code=0x020000, express=True, caps=caps)
    irqs = {IrqIndex.INTX: 1, IrqIndex.MSI: 4, IrqIndex.MSIX: 8, IrqIndex.ERR: 1, IrqIndex.REQ: 1}
    regions = {
        0: Region(0x100, read=lambda o, c: bar0[o : o + c], write=write),
        2: Region(2 * PAGE, memory=memory, mmap_areas=[(PAGE, PAGE)]),
    }
    options: dict[str, Any] = {
        "max_data_xfer_size": 4096,
        "max_dma_regions": 8,
        "migration": BarDevice((64,)),
        **kwargs,
    }
    return VfioUserDevice(pci=pci, regions=regions, irqs=irqs, **options)


def _make_fd(kind: int, keep: list[int]) -> int:
    """An fd of ``kind``; fds it needs kept open (a full pipe's read end) go to ``keep``."""
    if kind == 0:
        return os.eventfd(0)
    if kind == 2:
        read, write = os.pipe()
        os.close(write)
        return read
    if kind == 4:  # blocking and full: a write of 1 would wait for a reader
        fd = os.eventfd(0)
        os.write(fd, EVENTFD_MAX.to_bytes(8, "little"))
        return fd
    if kind == 5:  # the write end of a full pipe, blocking
        read, write = os.pipe()
        os.set_blocking(write, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write, bytes(65536))
        os.set_blocking(write, True)
        keep.append(read)  # open till the input ends: a write there would block
        return write
    if kind == 6:
        left, right = socket.socketpair()
        right.close()
        return left.detach()
    fd = os.memfd_create("fuzz")
    os.ftruncate(fd, {1: 2 * PAGE, 3: PAGE, 7: 8 << 40}[kind])
    return fd


def _emulate(device: VfioUserDevice) -> None:
    """What a device does between requests: write guest memory it can reach and raise
    its interrupts. Neither may block, whatever the client handed over."""
    mapped = [r for r in device.dma.regions if r.mapping is not None]
    for region in mapped:
        device.dma.mark_dirty(device.dma.translate(region.iova, 1, write=True))
    for index in IrqIndex:
        for vector in range(device.irqs.counts[index]):
            device.irqs.trigger(index, vector, strict=False)
    held = sum(r.dirty.nbytes for r in device.dma.regions if r.dirty is not None)
    if held > CHUNK_BYTES * len(mapped):
        raise FuzzBug(f"dirty logs hold {held} bytes for {len(mapped)} dirtied pages")


def count_fds() -> int:
    """Open fds once no eventfd write holds a dup (none can stick here: a full eventfd is
    skipped, and nothing else fills one)."""
    if not SIGNALLERS.wait_idle(5):
        raise FuzzBug("an eventfd write is stuck")
    return len(os.listdir("/proc/self/fd"))


def fuzz_vfio_user_server(data: bytes) -> None:
    if not data:
        return
    memory = SharedMemory(2 * PAGE)
    keep: list[int] = []
    try:
        before = count_fds()
        device = sample_device(memory)
        session = Session(negotiated=bool(data[0] & 1))
        pos = 1
        while pos + 3 <= len(data):
            raw = data[pos]
            command = raw if raw < 20 else _COMMANDS[raw % len(_COMMANDS)]
            nfds, kind, length = data[pos + 1] & 3, data[pos + 1] >> 2 & 7, data[pos + 2]
            payload = memoryview(data[pos + 3 : pos + 3 + length])
            pos += 3 + length
            fds = [_make_fd(kind, keep) for _ in range(nfds)]
            try:
                reply = handle(device, session, command, payload, fds)
            except CloseConnection:
                session = Session()
            except OSError as exc:
                if not exc.errno or exc.errno < 0:
                    raise FuzzBug(f"command {command}: errno {exc.errno!r}") from None
            else:
                size = 16 + sum(memoryview(p).nbytes for p in reply.parts)
                if size > device.max_msg_size + 4096:
                    raise FuzzBug(f"command {command}: reply of {size} bytes")
                for fd in reply.fds:
                    os.fstat(fd)  # borrowed fds must be open
            finally:
                for fd in fds:
                    os.close(fd)
            _emulate(device)
        for fd in device.disconnected():
            os.close(fd)
        if device.dma.regions:
            raise FuzzBug(f"{len(device.dma.regions)} dma regions survive the client")
        after = count_fds() - len(keep)
        if after != before:
            raise FuzzBug(f"{after - before:+d} fds after the client went away")
    finally:
        for fd in keep:
            os.close(fd)
        memory.close()
