"""The client side of vfio-user: what talks to a server (a device emulator) to move its state.

`open_vfio_user_client` / `VfioUserClient`: VERSION, control requests through the codec's
`ClientConnection`, migration state changes; its MIG_DATA_WRITE / MIG_DATA_READ pipelines
(`_pipeline`, `_read_pipeline`) keep a window of messages in flight straight on the socket,
read data handed out as views of receive arenas. On it: the ``vfio-user:SOCKPATH`` sink
(`open_vfio_user_sink`) that loads a device's state, and the source (`open_vfio_user_source`)
that reads it. A refused request raises `VfioUserCommandError` (`WriteFailed` for a
MIG_DATA_WRITE, with its stream offset and idx range).

May import: the codec (``vfiomig.vfio_user._*``), `sinks`, `sources`, `transport`, `_core`,
`_logs`, `_units`; never the server library (``vfiomig.vfio_user.server``).
"""

from vfiomig._public import claim
from vfiomig.vfio_user.client._client import VfioUserClient, open_vfio_user_client
from vfiomig.vfio_user.client._pipeline import VfioUserCommandError, WriteFailed
from vfiomig.vfio_user.client._sink import VfioUserSink, open_vfio_user_sink
from vfiomig.vfio_user.client._source import VfioUserSource, open_vfio_user_source

__all__ = [
    "VfioUserClient",
    "VfioUserCommandError",
    "VfioUserSink",
    "VfioUserSource",
    "WriteFailed",
    "open_vfio_user_client",
    "open_vfio_user_sink",
    "open_vfio_user_source",
]

claim(__name__, globals(), __all__)
