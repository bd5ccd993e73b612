"""vfiomig: reassemble VFIO device state sent over QEMU multifd channels.

The public surface: `serve_receiver` with `ReceiverConfig`/`DeviceSetup` on the receiving
side, `send_migration` with `SendDevice` on the sending side, the sinks, sources and the
error hierarchy. Everything else lives in private modules.
"""

from vfiomig._core import (
    IMPLEMENTATION as IMPLEMENTATION,
)
from vfiomig._core import (
    AbortedError as AbortedError,
)
from vfiomig._core import (
    ConfigStateError as ConfigStateError,
)
from vfiomig._core import (
    HandshakeError as HandshakeError,
)
from vfiomig._core import (
    PacketError as PacketError,
)
from vfiomig._core import (
    SinkError as SinkError,
)
from vfiomig._core import (
    StallError as StallError,
)
from vfiomig._core import (
    StreamIncompleteError as StreamIncompleteError,
)
from vfiomig._core import (
    UsageError as UsageError,
)
from vfiomig._core import (
    VfioMigError as VfioMigError,
)
from vfiomig._send import SendDevice as SendDevice
from vfiomig._send import SendReport as SendReport
from vfiomig._send import send_migration as send_migration
from vfiomig._service import serve_receiver as serve_receiver
from vfiomig._session import DeviceReport as DeviceReport
from vfiomig._session import DeviceSetup as DeviceSetup
from vfiomig._session import MigrationFailed as MigrationFailed
from vfiomig._session import ReceiverConfig as ReceiverConfig
from vfiomig._session import Session as Session
from vfiomig._session import SessionReport as SessionReport
from vfiomig.sinks._base import ConfigTarget as ConfigTarget
from vfiomig.sinks._base import Sink as Sink
from vfiomig.sinks._callback import CallbackConfig as CallbackConfig
from vfiomig.sinks._callback import CallbackSink as CallbackSink
from vfiomig.sinks._fd import ConfigDir as ConfigDir
from vfiomig.sinks._fd import FdSink as FdSink
from vfiomig.sinks._fd import NullSink as NullSink
from vfiomig.sources._base import Source as Source

__version__ = "0.1.0"
