"""The client side of vfio-user: what talks to a server (a device emulator), as a VMM does.

`open_vfio_user_client` / `VfioUserClient`: VERSION, requests through the codec's
`ClientConnection` on a `_channel` that carries fds both ways and answers the server's
DMA_READ / DMA_WRITE from the `GuestMemory` the client provides; the device calls
(`_device_calls`: info, regions and their mmappable areas (`DeviceRegion`, `MappedRegion`),
their ioeventfds (`RegionIoFd`), REGION_WRITE_MULTI, interrupts on eventfds (`Interrupt`)
and their masks, DMA_MAP of memfds (`GuestRegion`), dirty logging); migration state changes;
its MIG_DATA_WRITE / MIG_DATA_READ pipelines (`_pipeline`, `_read_pipeline`) keep a window
of messages in flight straight on the socket, read data handed out as views of receive
arenas; in STOP_COPY the socket may instead go to the C send path's reader thread, which
reads the same way in C (`_native_read`, `VfioUserClient.native_read`). On it: the
``vfio-user:SOCKPATH`` sink (`open_vfio_user_sink`) that loads a device's state, and the
source (`open_vfio_user_source`) that reads it, PCI config space included (`_config_space`).
A refused request raises `VfioUserCommandError` (`WriteFailed` for a MIG_DATA_WRITE, with
its stream offset and idx range). Test fixtures on it: `vfiomig.testing.vfio_user`.

May import: the codec (``vfiomig.vfio_user._*``), `sinks`, `sources`, `transport`, `_core`,
`_logs`, `_units`; never the server library (``vfiomig.vfio_user.server``).
"""

from vfiomig._public import claim
from vfiomig.vfio_user.client._client import VfioUserClient, open_vfio_user_client
from vfiomig.vfio_user.client._guest_memory import GuestMemory, GuestRegion
from vfiomig.vfio_user.client._interrupts import Interrupt
from vfiomig.vfio_user.client._io_fds import RegionIoFd
from vfiomig.vfio_user.client._pipeline import VfioUserCommandError, WriteFailed
from vfiomig.vfio_user.client._regions import DeviceRegion, MappedRegion
from vfiomig.vfio_user.client._sink import VfioUserSink, open_vfio_user_sink
from vfiomig.vfio_user.client._source import VfioUserSource, open_vfio_user_source

__all__ = [
    "DeviceRegion",
    "GuestMemory",
    "GuestRegion",
    "Interrupt",
    "MappedRegion",
    "RegionIoFd",
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
