"""What a channel's framer yields: its events (`ChannelHello`, `PacketHeader`,
`RamSkipped`, `ChannelEnd`, or `NEED_DATA`), the statuses of its pump, and the sizes it
receives with. The C core imports these classes, so that both cores return the same types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class ChannelHello:
    """The handshake was accepted; ``channel_id`` is the sender's channel number."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """A device-state packet begins; ``size`` data bytes follow (VFIO header excluded)."""

    idstr: str
    instance: int
    version: int
    idx: int
    flags: int
    size: int


@dataclass(frozen=True, slots=True)
class RamSkipped:
    """A RAM or SYNC packet of ``size`` payload bytes was skipped."""

    flags: int
    size: int


@dataclass(frozen=True, slots=True)
class ChannelEnd:
    """The channel ended cleanly, between two packets."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: `Framer.next_event` returns this when it needs more bytes (or `Framer.feed` of b"").
NEED_DATA: Final = _NeedData()

Event = ChannelHello | PacketHeader | RamSkipped | ChannelEnd

#: `Framer.pump` statuses: receive more bytes; the channel ended cleanly; a packet header
#: the caller must take (unknown or unrouted device, or an offer refused for budget); a
#: packet whose offer was accepted and whose data the caller must read and deliver.
PUMP_NEED_DATA: Final = 0
PUMP_END: Final = 1
PUMP_HEADER: Final = 2
PUMP_ACCEPTED: Final = 3
#: `Framer.pump_recv` only: ``recv_into`` has nothing more now; wait until it has.
PUMP_WOULD_BLOCK: Final = 4

#: Bytes `Framer.pump_recv` asks ``recv_into`` for at a time into the framer's buffer (at
#: most the buffer's size); when they do not fit after the unparsed bytes, those move to the
#: front (the C core: to a new block, if packets of the old one are still held).
RECV_CHUNK: Final = 1024 * 1024
#: The data of a packet this large (or a quarter of the framer's buffer) goes straight into
#: its own buffer in `Framer.pump_recv` (and only the next header is received after it, so
#: that the next packet's data does so too); smaller packets are received into the
#: framer's buffer with the packets around them.
BIG_PAYLOAD: Final = 256 * 1024
#: The framer's buffer (the C core's receive block).
BUFFER_SIZE: Final = 2 * 1024 * 1024


def new_payload_buffer(size: int) -> bytearray:
    """A buffer for one packet's data that the caller will fill entirely.

    The C core returns it without zero-filling it: at 1 MiB packets the fill and its page
    faults were a third of the receive path's time (benchmarks/README.md).
    """
    if size < 0:
        raise ValueError("negative size")
    return bytearray(size)
