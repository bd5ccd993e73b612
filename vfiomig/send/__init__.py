"""The sending side: packetise each device's source and spread it over the channels.

- `_types`: `SendDevice`, `SendReport`, `SendStatus` (progress as it goes), `SendError`;
- `_sender`: `send_migration`: channels, orders (QEMU's round-robin and others), the
  producers that read each source and spread its packets;
- `_channel`: one data channel's writer: its `Outbox`, batched writes, pacing;
- `_control`: drives the receiver's control channel around the multifd data (hello,
  precopy, switchover, then the receiver's events);
- `_precopy`: one device's precopy phase (rounds of PRE_COPY data as ``precopy`` messages).
May import: `vfiomig._core`, `vfiomig._units`, `vfiomig.transport`, `vfiomig.sources`,
`vfiomig.control` (its client).
"""

from vfiomig._public import claim
from vfiomig.send._sender import ORDERS, send_migration
from vfiomig.send._types import (
    PrecopyOptions,
    PrecopyReport,
    SendDevice,
    SendError,
    SendReport,
    SendStatus,
)

__all__ = [
    "ORDERS",
    "PrecopyOptions",
    "PrecopyReport",
    "SendDevice",
    "SendError",
    "SendReport",
    "SendStatus",
    "send_migration",
]

claim(__name__, globals(), __all__)
