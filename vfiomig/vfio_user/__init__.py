"""The vfio-user protocol subset vfiomig needs to migrate device state (spec v0.9.2).

- `_messages` / `_protocol`: the sans-IO codec and connection state machines;
- `_client`: a trio client (`open_vfio_user_client`); `_pipeline` / `_read_pipeline`: its
  MIG_DATA_WRITE / MIG_DATA_READ pipelines (a window in flight, straight on the socket);
- `_sink` / `_source`: ``vfio-user:SOCKPATH`` sink and ``vfio-user:SOCKPATH[,config=FILE]``
  source;
- `_device` / `_server`: a trio server for Python device emulators following
  libvfio-user's rules (`serve_vfio_user`), and `BarDevice`, an example emulator.
"""

from vfiomig.vfio_user._bar_device import BarDevice
from vfiomig.vfio_user._client import VfioUserClient, open_vfio_user_client
from vfiomig.vfio_user._device import Emulator, VfioUserDevice
from vfiomig.vfio_user._messages import Capabilities, Command, MigState, ProtocolError
from vfiomig.vfio_user._pipeline import VfioUserCommandError, WriteFailed
from vfiomig.vfio_user._server import serve_vfio_user, serve_vfio_user_connection
from vfiomig.vfio_user._sink import VfioUserSink, open_vfio_user_sink
from vfiomig.vfio_user._source import VfioUserSource, open_vfio_user_source

__all__ = [
    "BarDevice",
    "Capabilities",
    "Command",
    "Emulator",
    "MigState",
    "ProtocolError",
    "VfioUserClient",
    "VfioUserCommandError",
    "VfioUserDevice",
    "VfioUserSink",
    "VfioUserSource",
    "WriteFailed",
    "open_vfio_user_client",
    "open_vfio_user_sink",
    "open_vfio_user_source",
    "serve_vfio_user",
    "serve_vfio_user_connection",
]
