"""The ``vfio_user_server`` fuzz target: a whole device's request handlers, with real fds.

An input is a seed byte, then records ``[command u8][fds u8][length u8][payload]``:
``fds`` asks for ``fds & 3`` fds of the kind ``fds >> 2 & 3`` (eventfd, memfd of two
pages, the read end of a pipe, a memfd of one page) to ride with the request, as
SCM_RIGHTS would bring them. Every request must end in a reply or an errno
(``OSError`` / ``CloseConnection``), never another exception; a reply must fit in a
message; and once the client is gone (``disconnected``) every fd the device kept must
be back and the process must have exactly the fds it had before: none leaked, none
closed twice.
"""

from __future__ import annotations

import os
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


def _make_fd(kind: int) -> int:
    if kind == 0:
        return os.eventfd(0)
    if kind == 2:
        read, write = os.pipe()
        os.close(write)
        return read
    fd = os.memfd_create("fuzz")
    os.ftruncate(fd, 2 * PAGE if kind == 1 else PAGE)
    return fd


def _count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fuzz_vfio_user_server(data: bytes) -> None:
    if not data:
        return
    memory = SharedMemory(2 * PAGE)
    try:
        before = _count_fds()
        device = sample_device(memory)
        session = Session(negotiated=bool(data[0] & 1))
        pos = 1
        while pos + 3 <= len(data):
            raw = data[pos]
            command = raw if raw < 20 else _COMMANDS[raw % len(_COMMANDS)]
            nfds, kind, length = data[pos + 1] & 3, data[pos + 1] >> 2 & 3, data[pos + 2]
            payload = memoryview(data[pos + 3 : pos + 3 + length])
            pos += 3 + length
            fds = [_make_fd(kind) for _ in range(nfds)]
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
        for fd in device.disconnected():
            os.close(fd)
        if device.dma.regions:
            raise FuzzBug(f"{len(device.dma.regions)} dma regions survive the client")
        after = _count_fds()
        if after != before:
            raise FuzzBug(f"{after - before:+d} fds after the client went away")
    finally:
        memory.close()
