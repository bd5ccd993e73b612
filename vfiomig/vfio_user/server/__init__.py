"""The vfio-user server library device emulators are written on (docs/vfio-user-emulators.md).

`VfioUserDevice` puts a device together: `PciConfig` (config space and capabilities:
`pm_cap`, `msi_cap`, `msix_cap`, `pcie_cap`, `vendor_cap`, extended `PciExtCap`), `Region`
(optionally backed by mmappable `SharedMemory` or the emulator's `FileMemory`, with
`IoEventFd` doorbells), interrupt counts (`IrqIndex`), `MigrationCallbacks` (with
`WriteBuffer`: MIG_DATA_WRITE bodies received straight into the emulator's memory) and a
reset callback; the emulator reaches guest memory through ``device.dma`` (`Dma`) and raises
interrupts through ``device.irqs`` (`Irqs`). `serve_vfio_user` serves it on a UNIX socket,
one client at a time; `start_vfio_user_thread` from a thread of its own, for programs not
written on trio (`VfioUserThread`). `Emulator` / `BarDevice`: the older migration-only emulator
interface and its example.

Inside: `_serve` listens and accepts, `_connection` serves one client (framing, fds,
batched replies, the fast path of register accesses, MIG_DATA_WRITE bodies received into
a `WriteBuffer`), `_server_requests` the DMA_READ / DMA_WRITE it sends for emulator
tasks, `_handlers` and `_region_handlers` the per-command rules (sans-IO) over the
device's parts (`_device`, `_pci`, `_regions`, `_dma`, `_irqs`, `_migration`), `_session`
what the handlers share per client, `_thread` the server in a thread of its own.

May import: the codec (``vfiomig.vfio_user._*``), `transport`, `_core`, `_logs`; never the
client (``vfiomig.vfio_user.client``).
"""

from vfiomig._public import claim
from vfiomig.vfio_user.server._bar_device import BarDevice
from vfiomig.vfio_user.server._device import Emulator, VfioUserDevice
from vfiomig.vfio_user.server._dma import Dma, DmaRegion, Sg
from vfiomig.vfio_user.server._irqs import IrqIndex, Irqs
from vfiomig.vfio_user.server._migration import MigrationCallbacks, WriteBuffer
from vfiomig.vfio_user.server._pci import (
    PciCap,
    PciConfig,
    PciExtCap,
    msi_cap,
    msix_cap,
    pcie_cap,
    pm_cap,
    vendor_cap,
)
from vfiomig.vfio_user.server._regions import FileMemory, IoEventFd, Region, SharedMemory
from vfiomig.vfio_user.server._serve import serve_vfio_user, serve_vfio_user_connection
from vfiomig.vfio_user.server._session import ResetReason
from vfiomig.vfio_user.server._thread import VfioUserThread, start_vfio_user_thread

__all__ = [
    "BarDevice",
    "Dma",
    "DmaRegion",
    "Emulator",
    "FileMemory",
    "IoEventFd",
    "IrqIndex",
    "Irqs",
    "MigrationCallbacks",
    "PciCap",
    "PciConfig",
    "PciExtCap",
    "Region",
    "ResetReason",
    "Sg",
    "SharedMemory",
    "VfioUserDevice",
    "VfioUserThread",
    "WriteBuffer",
    "msi_cap",
    "msix_cap",
    "pcie_cap",
    "pm_cap",
    "serve_vfio_user",
    "serve_vfio_user_connection",
    "start_vfio_user_thread",
    "vendor_cap",
]

claim(__name__, globals(), __all__)
