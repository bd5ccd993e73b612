"""Decoding one message body by command and direction, for both sides' connections (sans-IO).

The body classes live by concept: `_version` (VERSION), `_migration_bodies`
(DEVICE_FEATURE, MIG_DATA_*), `_layouts` (region access and info, IRQs, DMA); this module
adds the bodies every command shares (empty, opaque, error, malformed) and the tables
that pick a decoder. A malformed body decodes to `Malformed`, never to an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from vfiomig.vfio_user._header import Command, ProtocolError
from vfiomig.vfio_user._layouts import (
    RegionInfo,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteReply,
)
from vfiomig.vfio_user._migration_bodies import (
    DeviceFeature,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
)
from vfiomig.vfio_user._version import Version


@dataclass(frozen=True, slots=True)
class Empty:
    """A body with no fields: DEVICE_RESET request, MIG_DATA_WRITE and DEVICE_RESET replies.

    Extra bytes are tolerated and dropped, as libvfio-user does.
    """

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: memoryview) -> Empty:
        return cls()


@dataclass(frozen=True, slots=True)
class Opaque:
    """The payload of a command vfiomig does not implement (DMA_MAP, IRQs, ...)."""

    data: bytes

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, payload: memoryview) -> Opaque:
        return cls(bytes(payload))


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A reply with the ERROR flag: header only, ``error_no`` is the errno (may be 0)."""

    errno: int

    def pack(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Malformed:
    """A message that was framed but whose body could not be decoded.

    The peer's fault; a server answers it with EINVAL, a client treats it as fatal.
    """

    reason: str


Body: TypeAlias = (
    "Version | DeviceFeature | MigDataRead | MigDataReadReply | MigDataWrite | RegionRead"
    " | RegionReadReply | RegionWrite | RegionWriteReply | RegionInfo | Empty | Opaque"
    " | ErrorReply | Malformed"
)

_Decoder: TypeAlias = "Callable[[memoryview], Body]"

_DECODE_REQUEST: dict[int, _Decoder] = {
    Command.VERSION: Version.unpack,
    Command.DEVICE_FEATURE: DeviceFeature.unpack,
    Command.MIG_DATA_READ: MigDataRead.unpack,
    Command.MIG_DATA_WRITE: MigDataWrite.unpack,
    Command.REGION_READ: RegionRead.unpack,
    Command.REGION_WRITE: RegionWrite.unpack,
    Command.DEVICE_GET_REGION_INFO: RegionInfo.unpack,
    Command.DEVICE_RESET: Empty.unpack,
}
_DECODE_REPLY: dict[int, _Decoder] = {
    Command.VERSION: Version.unpack,
    Command.DEVICE_FEATURE: DeviceFeature.unpack,
    Command.MIG_DATA_READ: MigDataReadReply.unpack,
    Command.MIG_DATA_WRITE: Empty.unpack,
    Command.REGION_READ: RegionReadReply.unpack,
    Command.REGION_WRITE: RegionWriteReply.unpack,
    Command.DEVICE_GET_REGION_INFO: RegionInfo.unpack,
    Command.DEVICE_RESET: Empty.unpack,
}


def decode_body(
    command: int, *, reply: bool, error: bool, error_no: int, payload: memoryview
) -> Body:
    """Decode one message's payload; a malformed one becomes `Malformed`, never an exception."""
    if reply and error:
        return ErrorReply(error_no)
    table = _DECODE_REPLY if reply else _DECODE_REQUEST
    decode = table.get(command)
    if decode is None:
        return Opaque(bytes(payload))
    try:
        return decode(payload)
    except ProtocolError as exc:
        return Malformed(exc.message)
