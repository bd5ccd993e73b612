"""The kernel VFIO migration v2 uAPI: a thin ioctl layer (`_uapi`) and the ``vfio:`` sink.

`_uapi` is as thin as the kernel's interface (struct layouts, request numbers, one function
per ioctl, an injectable ``ioctl`` so tests can put a fake device behind it:
`vfiomig.testing.FakeVfioDevice`). The sink drives the device's FSM around it.
May import: `vfiomig._core`, `vfiomig._units`, `vfiomig.sinks`, `vfiomig.sources`.
"""

from vfiomig.vfio._sink import DataFdSink, VfioSink, open_vfio_sink

__all__ = ["DataFdSink", "VfioSink", "open_vfio_sink"]
