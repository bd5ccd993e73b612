"""vfio-user (spec v0.9.2): a server library for Python device emulators, and the client
that migrates their state. Three rooms, by role:

- ``vfio_user`` itself (``_header``, ``_version``, ``_migration_bodies``, ``_layouts``,
  ``_messages``, ``_protocol``, ``_fsm``): the sans-IO codec both sides share: the message
  header and framing, VERSION and its capabilities, the migration bodies, the region/IRQ/DMA
  layouts, the connection state machines and the migration state machine's arcs;
- `vfiomig.vfio_user.server`: the library emulators are written on (`VfioUserDevice`,
  `serve_vfio_user`, ...; docs/vfio-user-emulators.md);
- `vfiomig.vfio_user.client`: what talks to a server (`open_vfio_user_client`, the
  ``vfio-user:`` sink and source).

The names users import are re-exported here, so ``from vfiomig.vfio_user import
VfioUserDevice`` keeps working; the codec imports neither room, and the rooms never import
each other.
"""

from vfiomig._public import claim
from vfiomig.vfio_user._header import Command, ProtocolError
from vfiomig.vfio_user._migration_bodies import MigState
from vfiomig.vfio_user._version import Capabilities
from vfiomig.vfio_user.client import (
    VfioUserClient,
    VfioUserCommandError,
    VfioUserSink,
    VfioUserSource,
    WriteFailed,
    open_vfio_user_client,
    open_vfio_user_sink,
    open_vfio_user_source,
)
from vfiomig.vfio_user.server import (
    BarDevice,
    Dma,
    DmaRegion,
    Emulator,
    FileMemory,
    IoEventFd,
    IrqIndex,
    Irqs,
    MigrationCallbacks,
    PciCap,
    PciConfig,
    PciExtCap,
    Region,
    ResetReason,
    Sg,
    SharedMemory,
    VfioUserDevice,
    VfioUserThread,
    WriteBuffer,
    msi_cap,
    msix_cap,
    pcie_cap,
    pm_cap,
    serve_vfio_user,
    serve_vfio_user_connection,
    start_vfio_user_thread,
    vendor_cap,
)

__all__ = [
    "BarDevice",
    "Capabilities",
    "Command",
    "Dma",
    "DmaRegion",
    "Emulator",
    "FileMemory",
    "IoEventFd",
    "IrqIndex",
    "Irqs",
    "MigState",
    "MigrationCallbacks",
    "PciCap",
    "PciConfig",
    "PciExtCap",
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
    "VfioUserThread",
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
    "start_vfio_user_thread",
    "vendor_cap",
]

claim(__name__, globals(), __all__)
