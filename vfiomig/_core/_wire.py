"""Codecs for the bytes on a data channel: QEMU's multifd format for device state.

Every layout here is packed and big-endian (SPEC.md §1), except the VFIO device-state
packet header, which QEMU's pre-merge postings wrote in host byte order (``endian="host"``).
Functions here are pure: bytes in, values out, `PacketError` for anything malformed.
"""

from __future__ import annotations

import struct
from typing import Final, Literal

from vfiomig._core._errors import ChannelCountError, ConfigStateError, HandshakeError

MULTIFD_MAGIC: Final = 0x11223344
MULTIFD_VERSION: Final = 1
MULTIFD_FLAG_SYNC: Final = 0x01
MULTIFD_FLAG_DEVICE_STATE: Final = 0x40

HANDSHAKE_SIZE: Final = 64
COMMON_HEADER_SIZE: Final = 12
IDSTR_SIZE: Final = 256
DEVICE_HEADER_SIZE: Final = 276  # 12 common + idstr[256] + instance_id u32 + next_packet_size u32
RAM_HEADER_BASE: Final = 320  # MultiFDPacket_t without its offset[] array
RAM_SIZE_OFFSET: Final = 20  # next_packet_size inside a RAM packet header

VFIO_HEADER_SIZE: Final = 12  # VFIODeviceStatePacket: version, idx, flags
VFIO_PACKET_VERSION: Final = 0
VFIO_IDX_INVALID: Final = 0xFFFFFFFF
VFIO_FLAG_CONFIG_STATE: Final = 0x1

DEV_CONFIG_STATE: Final = 0xFFFFFFFFEF100002
END_OF_STATE: Final = 0xFFFFFFFFEF100001
CONFIG_MARKER_SIZE: Final = 8

DEFAULT_PACKET_CAP: Final = 64 * 1024 * 1024

Endian = Literal["be", "host"]

_HANDSHAKE = struct.Struct(">II16sB39x")
_COMMON = struct.Struct(">III")
_DEVICE_TAIL = struct.Struct(">II")  # instance_id, next_packet_size at offset 268
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_VFIO = {"be": struct.Struct(">III"), "host": struct.Struct("=III")}


def vfio_header_struct(endian: Endian) -> struct.Struct:
    """The ``struct`` layout of the VFIO device-state packet header for ``endian``."""
    return _VFIO[endian]


def encode_handshake(uuid: bytes, channel_id: int) -> bytes:
    """Build the 64-byte MultiFDInit_t a sender writes first on every channel."""
    if len(uuid) != 16:
        raise ValueError(f"uuid must be 16 bytes, not {len(uuid)}")
    return _HANDSHAKE.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def decode_handshake(data: bytes | bytearray | memoryview, *, uuid: bytes, channels: int) -> int:
    """Check a 64-byte MultiFDInit_t and return its channel id.

    Raises:
        HandshakeError: bad magic or version, another session's uuid, id out of range.
    """
    magic, version, peer_uuid, channel_id = _HANDSHAKE.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise HandshakeError(
            f"channel handshake has magic {magic:#x} (expected {MULTIFD_MAGIC:#x})"
        )
    if version != MULTIFD_VERSION:
        raise HandshakeError(
            f"channel handshake has version {version} (expected {MULTIFD_VERSION})"
        )
    if peer_uuid != uuid:
        raise HandshakeError(
            f"channel {channel_id} has uuid {format_uuid(peer_uuid)} (expected {format_uuid(uuid)})"
        )
    if channel_id >= channels:
        raise ChannelCountError(
            f"channel id {channel_id} is not below the channel count {channels}: the sender"
            " opens more channels than this receiver expects (QEMU's multifd-channels must"
            " equal --channels)"
        )
    return int(channel_id)


def format_uuid(uuid: bytes) -> str:
    """Format 16 bytes the way QEMU prints a uuid."""
    h = uuid.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_uuid(text: str) -> bytes:
    """Parse a uuid in its usual text form (dashes optional) into 16 bytes."""
    digits = text.replace("-", "").strip()
    if len(digits) != 32:
        raise ValueError(f"uuid {text!r} must have 32 hex digits")
    return bytes.fromhex(digits)


def encode_device_header(idstr: str, instance: int, size: int) -> bytes:
    """Build the 276-byte multifd device-state header for a payload of ``size`` bytes."""
    raw = idstr.encode()
    if len(raw) >= IDSTR_SIZE:
        raise ValueError(f"idstr {idstr!r} is {len(raw)} bytes (max {IDSTR_SIZE - 1})")
    return (
        _COMMON.pack(MULTIFD_MAGIC, MULTIFD_VERSION, MULTIFD_FLAG_DEVICE_STATE)
        + raw.ljust(IDSTR_SIZE, b"\0")
        + _DEVICE_TAIL.pack(instance, size)
    )


def encode_vfio_header(
    idx: int, flags: int = 0, *, version: int = 0, endian: Endian = "be"
) -> bytes:
    """Build the 12-byte VFIO device-state packet header."""
    return _VFIO[endian].pack(version, idx, flags)


def encode_packet(
    idstr: str, instance: int, idx: int, flags: int, data: bytes, *, endian: Endian = "be"
) -> bytes:
    """Build one whole multifd device-state packet (header, VFIO header, data)."""
    return (
        encode_device_header(idstr, instance, VFIO_HEADER_SIZE + len(data))
        + encode_vfio_header(idx, flags, endian=endian)
        + data
    )


def encode_ram_packet(page_count: int, payload: bytes, *, flags: int = 0) -> bytes:
    """Build a RAM (or SYNC) multifd packet as QEMU would, with ``page_count`` offsets."""
    header = bytearray(RAM_HEADER_BASE + 8 * page_count)
    _COMMON.pack_into(header, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags)
    _U32.pack_into(header, RAM_SIZE_OFFSET, len(payload))
    return bytes(header) + payload


def wrap_config(body: bytes) -> bytes:
    """Frame a config body with DEV_CONFIG_STATE and END_OF_STATE, as QEMU does."""
    return _U64.pack(DEV_CONFIG_STATE) + body + _U64.pack(END_OF_STATE)


def check_config_blob(name: str, idx: int, blob: bytes | bytearray | memoryview) -> None:
    """Check the config blob's framing markers.

    Raises:
        ConfigStateError: shorter than both markers, or a marker is wrong.
    """
    n = len(blob)
    if n < 2 * CONFIG_MARKER_SIZE:
        raise ConfigStateError(
            f"{name}: config packet idx {idx} is too short at {n} (min is {2 * CONFIG_MARKER_SIZE})",
            device=name,
            idx=idx,
        )
    (head,) = _U64.unpack_from(blob, 0)
    if head != DEV_CONFIG_STATE:
        raise ConfigStateError(
            f"{name}: config packet idx {idx} starts with {head:#x} (expected {DEV_CONFIG_STATE:#x})",
            device=name,
            idx=idx,
        )
    (tail,) = _U64.unpack_from(blob, n - CONFIG_MARKER_SIZE)
    if tail != END_OF_STATE:
        raise ConfigStateError(
            f"{name}: config packet idx {idx} ends with {tail:#x} (expected {END_OF_STATE:#x})",
            device=name,
            idx=idx,
        )


def device_name(idstr: str, instance: int) -> str:
    """The display name of a device in every message: ``idstr/instance``."""
    return f"{idstr}/{instance}"
