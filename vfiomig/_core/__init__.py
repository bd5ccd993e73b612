"""The sans-IO core: codecs, framer, reorder buffer, errors. No trio, sockets, os I/O or time.

This is the one selection point between the pure-Python reference and the C core
(``vfiomig._native``): ``VFIOMIG_PUREPYTHON=1`` forces Python, ``VFIOMIG_REQUIRE_NATIVE=1``
makes a missing C core an error instead of a fallback. `IMPLEMENTATION` says which is in use.
"""

from __future__ import annotations

from vfiomig._core._errors import (
    AbortedError,
    ConfigStateError,
    HandshakeError,
    PacketError,
    SinkError,
    StallError,
    StreamIncompleteError,
    UsageError,
    VfioMigError,
)
from vfiomig._core._framer import (
    NEED_DATA,
    ChannelEnd,
    ChannelHello,
    Framer,
    PacketHeader,
    RamSkipped,
)
from vfiomig._core._reorder import Budget, DeviceStatistics, Ready, ReorderBuffer

IMPLEMENTATION = "python"

__all__ = [
    "IMPLEMENTATION",
    "NEED_DATA",
    "AbortedError",
    "Budget",
    "ChannelEnd",
    "ChannelHello",
    "ConfigStateError",
    "DeviceStatistics",
    "Framer",
    "HandshakeError",
    "PacketError",
    "PacketHeader",
    "RamSkipped",
    "Ready",
    "ReorderBuffer",
    "SinkError",
    "StallError",
    "StreamIncompleteError",
    "UsageError",
    "VfioMigError",
]
