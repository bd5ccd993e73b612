"""vfiomig: reassemble VFIO device state sent over QEMU multifd channels.

The public surface: `serve_receiver` with `ReceiverConfig`/`DeviceSetup` on the receiving
side, `send_migration` with `SendDevice` on the sending side, the sinks, sources and the
error hierarchy. The stages live in subpackages (see ARCHITECTURE.md): `vfiomig.receive`,
`vfiomig.control`, `vfiomig.send`, `vfiomig.sinks`, `vfiomig.sources`, `vfiomig.vfio`,
`vfiomig.vfio_user`, `vfiomig.transport`, `vfiomig.testing`.
"""

from vfiomig._core import (
    IMPLEMENTATION,
    AbortedError,
    ConfigStateError,
    HandshakeError,
    PacketError,
    SinkError,
    SourceError,
    StallError,
    StreamIncompleteError,
    UsageError,
    VfioMigError,
)
from vfiomig._core._migstate import MigState
from vfiomig._public import claim
from vfiomig._version import __version__
from vfiomig.receive import (
    DeviceReport,
    DeviceSetup,
    MigrationFailed,
    ReceiverConfig,
    Session,
    SessionReport,
    serve_receiver,
)
from vfiomig.send import SendDevice, SendError, SendReport, send_migration
from vfiomig.sinks import (
    CallbackConfig,
    CallbackSink,
    ConfigDir,
    ConfigTarget,
    FdSink,
    NullSink,
    Sink,
)
from vfiomig.sources import Source

__all__ = [
    "IMPLEMENTATION",
    "AbortedError",
    "CallbackConfig",
    "CallbackSink",
    "ConfigDir",
    "ConfigStateError",
    "ConfigTarget",
    "DeviceReport",
    "DeviceSetup",
    "FdSink",
    "HandshakeError",
    "MigState",
    "MigrationFailed",
    "NullSink",
    "PacketError",
    "ReceiverConfig",
    "SendDevice",
    "SendError",
    "SendReport",
    "Session",
    "SessionReport",
    "Sink",
    "SinkError",
    "SourceError",
    "Source",
    "StallError",
    "StreamIncompleteError",
    "UsageError",
    "VfioMigError",
    "__version__",
    "send_migration",
    "serve_receiver",
]

claim(__name__, globals(), __all__)
