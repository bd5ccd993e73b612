"""The receive pipeline: listeners, one task per data channel, one loader per device.

- `_session`: the state the tasks share (devices, budget, parking lots) and the report;
- `_channels`: a channel task: handshake, framing through the core, backpressure;
- `_loader`: a loader task, sole owner of its device's output: gate, in-order writes,
  the finish step;
- `_service`: `serve_receiver`, wiring listeners, channels, loaders and the watchdog in
  one nursery.
May import: `vfiomig._core`, `vfiomig._units`, `vfiomig.transport`, `vfiomig.sinks`.
"""

from vfiomig._public import claim
from vfiomig.receive._service import ExtraTask, serve_receiver
from vfiomig.receive._session import (
    Device,
    DeviceReport,
    DeviceSetup,
    MigrationFailed,
    ReceiverConfig,
    Session,
    SessionEvent,
    SessionReport,
)

__all__ = [
    "Device",
    "DeviceReport",
    "DeviceSetup",
    "ExtraTask",
    "MigrationFailed",
    "ReceiverConfig",
    "Session",
    "SessionEvent",
    "SessionReport",
    "serve_receiver",
]

claim(__name__, globals(), __all__)
