"""The kernel VFIO migration v2 uAPI: a thin ioctl layer (`_uapi`), the ``vfio:`` sink and
the ``vfio:`` source, sharing one device-fd helper (`_device`: open, bind, flags, SET).

`_uapi` is as thin as the kernel's interface (struct layouts, request numbers, one function
per ioctl, an injectable ``ioctl`` so tests can put a fake device behind it:
`vfiomig.testing.FakeVfioDevice`). The sink drives the device's FSM around it.
May import: `vfiomig._core`, `vfiomig._units`, `vfiomig.sinks`, `vfiomig.sources`.
"""

from vfiomig._public import claim
from vfiomig.vfio._sink import DataFdSink, VfioSink, open_vfio_sink
from vfiomig.vfio._source import VfioSource, open_vfio_source

__all__ = ["DataFdSink", "VfioSink", "VfioSource", "open_vfio_sink", "open_vfio_source"]

claim(__name__, globals(), __all__)
