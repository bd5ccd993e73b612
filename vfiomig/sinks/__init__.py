"""Sinks: where a device's in-order stream and its config blob go.

`Sink` and `ConfigTarget` are the interfaces every loader writes through; this package also
holds the generic sinks: ``file:``, ``null:``, ``fd:`` (pipes through a C writer thread),
callbacks, and the ``--config-out`` directory. Device-specific sinks live beside their
protocol: the kernel VFIO sink in `vfiomig.vfio`, the vfio-user sink in `vfiomig.vfio_user`.
May import: `vfiomig._core`, `vfiomig._units`.
"""

from vfiomig._public import claim
from vfiomig.sinks._base import Chunk, ConfigTarget, Sink
from vfiomig.sinks._callback import CallbackConfig, CallbackSink
from vfiomig.sinks._fd import ConfigDir, FdSink, NullSink, config_file_name

__all__ = [
    "CallbackConfig",
    "CallbackSink",
    "Chunk",
    "ConfigDir",
    "ConfigTarget",
    "FdSink",
    "NullSink",
    "Sink",
    "config_file_name",
]

claim(__name__, globals(), __all__)
