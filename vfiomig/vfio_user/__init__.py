"""vfio-user (spec v0.9.2): a server library for Python device emulators, and the
migration client, sink and source vfiomig uses.

Server side (see docs/vfio-user-emulators.md):

- `VfioUserDevice` puts a device together: `PciConfig` (config space and capabilities:
  `pm_cap`, `msi_cap`, `msix_cap`, `pcie_cap`, `vendor_cap`), `Region` (optionally backed
  by mmappable `SharedMemory`), interrupt counts (`IrqIndex`), `MigrationCallbacks`
  (with `WriteBuffer`: MIG_DATA_WRITE bodies received straight into the emulator's memory)
  and a reset callback; the emulator reaches guest memory through ``device.dma`` (`Dma`) and
  raises interrupts through ``device.irqs`` (`Irqs`);
- `serve_vfio_user` serves it on a UNIX socket, one client at a time;
- `Emulator` / `BarDevice`: the older migration-only emulator interface and its example.

Client side: `open_vfio_user_client`, `open_vfio_user_sink`, `open_vfio_user_source`; the
client's MIG_DATA_WRITE / MIG_DATA_READ pipelines (`_pipeline`, `_read_pipeline`) keep a
window of messages in flight straight on the socket.
The sans-IO codecs are `_messages`, `_protocol` and `_wire`.
"""

from vfiomig.vfio_user._bar_device import BarDevice
from vfiomig.vfio_user._client import VfioUserClient, open_vfio_user_client
from vfiomig.vfio_user._device import Emulator, VfioUserDevice
from vfiomig.vfio_user._dma import Dma, DmaRegion, Sg
from vfiomig.vfio_user._irqs import IrqIndex, Irqs
from vfiomig.vfio_user._messages import Capabilities, Command, MigState, ProtocolError
from vfiomig.vfio_user._migration import MigrationCallbacks, WriteBuffer
from vfiomig.vfio_user._pci import (
    PciCap,
    PciConfig,
    msi_cap,
    msix_cap,
    pcie_cap,
    pm_cap,
    vendor_cap,
)
from vfiomig.vfio_user._pipeline import VfioUserCommandError, WriteFailed
from vfiomig.vfio_user._regions import Region, SharedMemory
from vfiomig.vfio_user._server import serve_vfio_user, serve_vfio_user_connection
from vfiomig.vfio_user._session import ResetReason
from vfiomig.vfio_user._sink import VfioUserSink, open_vfio_user_sink
from vfiomig.vfio_user._source import VfioUserSource, open_vfio_user_source

__all__ = [
    "BarDevice",
    "Capabilities",
    "Command",
    "Dma",
    "DmaRegion",
    "Emulator",
    "IrqIndex",
    "Irqs",
    "MigState",
    "MigrationCallbacks",
    "PciCap",
    "PciConfig",
    "ProtocolError",
    "Region",
    "ResetReason",
    "Sg",
    "SharedMemory",
    "VfioUserClient",
    "VfioUserCommandError",
    "VfioUserDevice",
    "VfioUserSink",
    "VfioUserSource",
    "WriteBuffer",
    "WriteFailed",
    "msi_cap",
    "msix_cap",
    "open_vfio_user_client",
    "open_vfio_user_sink",
    "open_vfio_user_source",
    "pcie_cap",
    "pm_cap",
    "serve_vfio_user",
    "serve_vfio_user_connection",
    "vendor_cap",
]
