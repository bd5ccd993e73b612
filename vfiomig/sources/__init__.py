"""Sources: where the sender reads a device's state (``synth:``, ``file:``, ``fd:``).

`Source` is the interface `vfiomig.send` packetises; device-specific sources live beside
their protocol (`vfiomig.vfio`, `vfiomig.vfio_user`).
May import: `vfiomig._core`, `vfiomig._units`.
"""

from vfiomig._public import claim
from vfiomig.sources._base import PrecopyInfo, Source
from vfiomig.sources._simple import FdSource, SynthSource

__all__ = ["FdSource", "PrecopyInfo", "Source", "SynthSource"]

claim(__name__, globals(), __all__)
