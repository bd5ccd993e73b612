"""The sans-IO core: codecs, framer, reorder buffer, errors. No trio, sockets, os I/O or time.

This is the one selection point between the pure-Python reference and the C core
(``vfiomig._native``): ``VFIOMIG_PUREPYTHON=1`` forces Python, ``VFIOMIG_REQUIRE_NATIVE=1``
makes a missing C core an error instead of a fallback. `IMPLEMENTATION` says which is in use.

The sinks take the C core's I/O helpers from here too: `PipeWriter` (a blocking pipe written
from a thread of its own) and `Run` (the type of `Ready.chunks`), None with the pure core;
so does the sender: `SendJob` (stream sources read and sent by C threads), None with the
pure core.

`IMPLEMENTATIONS` maps each implementation available in this process to a namespace with the
core's whole surface, so that tests run every core test against both.
"""

from __future__ import annotations

import os
import types
from typing import TYPE_CHECKING

from vfiomig._core._errors import (
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
from vfiomig._core._events import (
    NEED_DATA,
    PUMP_ACCEPTED,
    PUMP_END,
    PUMP_HEADER,
    PUMP_NEED_DATA,
    PUMP_WOULD_BLOCK,
    RECV_CHUNK,
    ChannelEnd,
    ChannelHello,
    PacketHeader,
    RamSkipped,
    new_payload_buffer,
)
from vfiomig._core._framer import Framer
from vfiomig._core._outbox import IOV_MAX, PACKET_HEADER_SIZE, Outbox, PacketHeaders, SendBuffer
from vfiomig._core._reorder import Budget, DeviceStatistics, Ready, ReorderBuffer

#: The pure-Python twins of everything in `_ACCELERATED`.
_reference = types.SimpleNamespace(
    Budget=Budget,
    Framer=Framer,
    ReorderBuffer=ReorderBuffer,
    new_payload_buffer=new_payload_buffer,
    Outbox=Outbox,
    PacketHeaders=PacketHeaders,
    SendBuffer=SendBuffer,
)

#: What the C core replaces of the Python reference (same names, signatures and errors).
_ACCELERATED = (
    "Budget",
    "Framer",
    "ReorderBuffer",
    "SendBuffer",
    "new_payload_buffer",
    "Outbox",
    "PacketHeaders",
    "SendBuffer",
)


def _load_native() -> types.ModuleType | None:
    # The one selection point. A missing C core is a fallback only when nobody asked for
    # it: CI sets VFIOMIG_REQUIRE_NATIVE=1 so that a broken build cannot pass silently.
    try:
        from vfiomig import _native
    except ImportError as exc:
        if os.environ.get("VFIOMIG_REQUIRE_NATIVE") == "1":
            raise ImportError(
                "VFIOMIG_REQUIRE_NATIVE=1 but the C core vfiomig._native cannot be imported"
                f" ({exc}); rebuild it with `pip install -e .`"
            ) from exc
        return None
    return _native


def _namespace(name: str, accelerator: object) -> types.ModuleType:
    """The core's whole surface with `_ACCELERATED` taken from ``accelerator``."""
    ns = types.ModuleType(f"vfiomig._core[{name}]")
    ns.__dict__.update({k: v for k, v in globals().items() if k in __all__})
    ns.__dict__.update({k: getattr(accelerator, k) for k in _ACCELERATED})
    ns.__dict__["IMPLEMENTATION"] = name
    return ns


_native = _load_native()
IMPLEMENTATION = "python"
#: Filled below, once __all__ is known; "python" always, "native" when it is in use.
IMPLEMENTATIONS: dict[str, types.ModuleType] = {}
if _native is not None and os.environ.get("VFIOMIG_PUREPYTHON") != "1":
    Framer = _native.Framer  # type: ignore[misc]
    Budget = _native.Budget  # type: ignore[misc]
    ReorderBuffer = _native.ReorderBuffer  # type: ignore[misc]
    new_payload_buffer = _native.new_payload_buffer
    Outbox = _native.Outbox  # type: ignore[misc]
    PacketHeaders = _native.PacketHeaders  # type: ignore[misc]
    SendBuffer = _native.SendBuffer  # type: ignore[misc]
    IMPLEMENTATION = "native"

if TYPE_CHECKING:
    from vfiomig._native import PipeWriter as PipeWriter
    from vfiomig._native import Run as Run
    from vfiomig._native import SendJob as SendJob
elif IMPLEMENTATION == "native":
    PipeWriter, Run, SendJob = _native.PipeWriter, _native.Run, _native.SendJob
else:  # the pure core writes pipes from the event loop, its batches are lists, and it
    # sends from trio tasks
    PipeWriter = Run = SendJob = None

__all__ = [
    "IMPLEMENTATION",
    "IOV_MAX",
    "NEED_DATA",
    "PACKET_HEADER_SIZE",
    "PUMP_ACCEPTED",
    "PUMP_END",
    "PUMP_HEADER",
    "PUMP_NEED_DATA",
    "PUMP_WOULD_BLOCK",
    "RECV_CHUNK",
    "AbortedError",
    "Budget",
    "ChannelEnd",
    "ChannelHello",
    "ConfigStateError",
    "DeviceStatistics",
    "Framer",
    "HandshakeError",
    "Outbox",
    "PacketHeaders",
    "PacketError",
    "PacketHeader",
    "RamSkipped",
    "Ready",
    "ReorderBuffer",
    "SendBuffer",
    "SinkError",
    "SourceError",
    "StallError",
    "StreamIncompleteError",
    "UsageError",
    "VfioMigError",
    "new_payload_buffer",
]

IMPLEMENTATIONS["python"] = _namespace("python", _reference)
if IMPLEMENTATION == "native":
    assert _native is not None
    IMPLEMENTATIONS["native"] = _namespace("native", _native)
