"""The vfio-user message bodies vfiomig speaks, and their byte layouts (sans-IO).

Everything here is in host byte order, as the vfio-user spec (v0.9.2) says, and packed.
Each body class packs itself into payload bytes (the part after the 16-byte header) and
unpacks from them; `unpack` checks every length before it slices, and raises
`ProtocolError` for anything malformed, never another exception.

Requests and replies that share a layout (VERSION, DEVICE_FEATURE) share a class; the
others have one class per direction, because the same command carries different fields
each way (REGION_READ asks for ``count`` bytes and gets them back).
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from vfiomig._core._errors import PacketError
from vfiomig._core._migstate import MigState as MigState


class ProtocolError(PacketError):
    """A vfio-user peer sent bytes that break the protocol (framing, layout, sequence)."""


class Command(enum.IntEnum):
    """vfio-user command numbers (spec table "Commands")."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


def command_name(command: int) -> str:
    """``MIG_DATA_WRITE`` for a known command, ``command 99`` otherwise."""
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


HEADER_SIZE: Final = 16
#: SO_SNDBUF of client and server (capped at wmem_max): room for a window of MIG_DATA_*.
SEND_BUFFER: Final = 4 * 1024 * 1024
MAJOR: Final = 0
#: Spec default for ``max_data_xfer_size`` and libvfio-user's own limit.
DEFAULT_MAX_DATA_XFER_SIZE: Final = 1024 * 1024
DEFAULT_PGSIZE: Final = 4096

# Header flags.
FLAG_TYPE_MASK: Final = 0xF
FLAG_TYPE_COMMAND: Final = 0
FLAG_TYPE_REPLY: Final = 1
FLAG_NO_REPLY: Final = 0x10
FLAG_ERROR: Final = 0x20

# DEVICE_FEATURE flags (same layout as the kernel's struct vfio_device_feature).
FEATURE_MASK: Final = 0xFFFF
FEATURE_GET: Final = 0x10000
FEATURE_SET: Final = 0x20000
FEATURE_PROBE: Final = 0x40000
FEATURE_MIGRATION: Final = 1
FEATURE_MIG_DEVICE_STATE: Final = 2
MIGRATION_STOP_COPY: Final = 1 << 0
MIGRATION_P2P: Final = 1 << 1
MIGRATION_PRE_COPY: Final = 1 << 2
#: ``data_fd`` is unused in vfio-user; libvfio-user's own client sends all ones.
NO_DATA_FD: Final = 0xFFFFFFFF

# Region info flags.
REGION_FLAG_READ: Final = 1 << 0
REGION_FLAG_WRITE: Final = 1 << 1

HEADER: Final = struct.Struct("=HHIII")
_VERSION = struct.Struct("=HH")
_ARGSZ_FLAGS = struct.Struct("=II")  # DEVICE_FEATURE header and MIG_DATA_* header alike
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")  # device_state, data_fd
_REGION_ACCESS = struct.Struct("=QII")  # offset, region, count
_REGION_INFO = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset

FEATURE_HEADER_SIZE: Final = _ARGSZ_FLAGS.size
MIG_DATA_HEADER_SIZE: Final = _ARGSZ_FLAGS.size
REGION_ACCESS_HEADER_SIZE: Final = _REGION_ACCESS.size
REGION_INFO_SIZE: Final = _REGION_INFO.size
#: Bytes a message adds around ``max_data_xfer_size`` bytes of data, at most.
MESSAGE_OVERHEAD: Final = HEADER_SIZE + REGION_ACCESS_HEADER_SIZE


class Packable(Protocol):
    """A body that can be sent: it packs itself into payload bytes."""

    def pack(self) -> bytes: ...


def _short(what: str, got: int, need: int) -> ProtocolError:
    return ProtocolError(f"{what} payload of {got} bytes is too short (min {need})")


# --------------------------------------------------------------------------- VERSION


@dataclass(frozen=True, slots=True)
class MigrationCaps:
    """The ``"migration"`` capability object (kept from v1; libvfio-user still sends it)."""

    pgsize: int | None = None
    max_bitmap_size: int | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The ``"capabilities"`` object of VERSION; a field left at ``None`` is not sent."""

    max_msg_fds: int | None = 1
    max_data_xfer_size: int | None = DEFAULT_MAX_DATA_XFER_SIZE
    pgsizes: int | None = DEFAULT_PGSIZE
    migration: MigrationCaps | None = None

    @property
    def data_xfer_limit(self) -> int:
        """``max_data_xfer_size``, or the spec default when the peer did not say."""
        if self.max_data_xfer_size is None:
            return DEFAULT_MAX_DATA_XFER_SIZE
        return self.max_data_xfer_size

    def to_json(self) -> bytes:
        """``{"capabilities": {...}}`` as UTF-8 with the NUL terminator libvfio-user wants."""
        caps: dict[str, object] = {}
        if self.max_msg_fds is not None:
            caps["max_msg_fds"] = self.max_msg_fds
        if self.max_data_xfer_size is not None:
            caps["max_data_xfer_size"] = self.max_data_xfer_size
        if self.pgsizes is not None:
            caps["pgsizes"] = self.pgsizes
        if self.migration is not None:
            mig: dict[str, int] = {}
            if self.migration.pgsize is not None:
                mig["pgsize"] = self.migration.pgsize
            if self.migration.max_bitmap_size is not None:
                mig["max_bitmap_size"] = self.migration.max_bitmap_size
            caps["migration"] = mig
        return json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"

    @classmethod
    def from_json(cls, raw: bytes) -> Capabilities:
        """Parse the JSON part of VERSION (NUL terminator optional); unknown keys are ignored.

        Raises:
            ProtocolError: not UTF-8 JSON, not an object, or a known field of the wrong type.
        """
        text = raw[:-1] if raw.endswith(b"\0") else raw
        try:
            top = json.loads(text.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"version capabilities are not valid json ({exc})") from None
        if not isinstance(top, dict):
            raise ProtocolError(
                f"version capabilities are a json {type(top).__name__}, not an object"
            )
        caps = top.get("capabilities", {})
        if not isinstance(caps, dict):
            raise ProtocolError(f"version field capabilities is a json {type(caps).__name__}")
        mig = caps.get("migration")
        if mig is not None and not isinstance(mig, dict):
            raise ProtocolError(f"version field migration is a json {type(mig).__name__}")
        return cls(
            max_msg_fds=_json_uint(caps, "max_msg_fds", 0),
            max_data_xfer_size=_json_uint(caps, "max_data_xfer_size", 1),
            pgsizes=_json_uint(caps, "pgsizes", 1),
            migration=None
            if mig is None
            else MigrationCaps(
                pgsize=_json_uint(mig, "pgsize", 1),
                max_bitmap_size=_json_uint(mig, "max_bitmap_size", 0),
            ),
        )


def _json_uint(obj: dict[str, object], key: str, minimum: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"version field {key} is {value!r}, not an integer")
    if not minimum <= value < 1 << 64:
        raise ProtocolError(f"version field {key} is {value} (min {minimum}, max {(1 << 64) - 1})")
    return value


@dataclass(frozen=True, slots=True)
class Version:
    """VERSION request and reply: ``u16 major, u16 minor``, then optional JSON."""

    major: int = MAJOR
    minor: int = 0
    capabilities: Capabilities | None = None

    def pack(self) -> bytes:
        caps = b"" if self.capabilities is None else self.capabilities.to_json()
        return _VERSION.pack(self.major, self.minor) + caps

    @classmethod
    def unpack(cls, payload: memoryview) -> Version:
        if len(payload) < _VERSION.size:
            raise _short("version", len(payload), _VERSION.size)
        major, minor = _VERSION.unpack_from(payload)
        raw = bytes(payload[_VERSION.size :])
        caps = Capabilities.from_json(raw) if raw.strip(b"\0") else None
        return cls(major, minor, caps)


# --------------------------------------------------------------------------- DEVICE_FEATURE


@dataclass(frozen=True, slots=True)
class DeviceFeature:
    """DEVICE_FEATURE request and reply: ``u32 argsz, u32 flags``, then feature data.

    ``argsz`` is the whole structure's size in a request that carries data, and the
    largest reply structure the client accepts in a GET.
    """

    argsz: int
    flags: int
    data: bytes = b""

    @property
    def feature(self) -> int:
        return self.flags & FEATURE_MASK

    def pack(self) -> bytes:
        return _ARGSZ_FLAGS.pack(self.argsz, self.flags) + self.data

    @classmethod
    def unpack(cls, payload: memoryview) -> DeviceFeature:
        if len(payload) < FEATURE_HEADER_SIZE:
            raise _short("device feature", len(payload), FEATURE_HEADER_SIZE)
        argsz, flags = _ARGSZ_FLAGS.unpack_from(payload)
        return cls(argsz, flags, bytes(payload[FEATURE_HEADER_SIZE:]))

    # Builders for the requests a migration client sends (byte-exact per the reference).

    @classmethod
    def get_migration(cls) -> DeviceFeature:
        return cls(FEATURE_HEADER_SIZE + _U64.size, FEATURE_GET | FEATURE_MIGRATION)

    @classmethod
    def get_state(cls) -> DeviceFeature:
        return cls(
            FEATURE_HEADER_SIZE + _STATE.size,
            FEATURE_GET | FEATURE_MIG_DEVICE_STATE,
            _STATE.pack(0, 0),
        )

    @classmethod
    def set_state(cls, state: MigState) -> DeviceFeature:
        return cls(
            FEATURE_HEADER_SIZE + _STATE.size,
            FEATURE_SET | FEATURE_MIG_DEVICE_STATE,
            _STATE.pack(state, NO_DATA_FD),
        )

    @classmethod
    def migration_reply(cls, request: DeviceFeature, migration_flags: int) -> DeviceFeature:
        return cls(FEATURE_HEADER_SIZE + _U64.size, request.flags, _U64.pack(migration_flags))

    @classmethod
    def state_reply(cls, request: DeviceFeature, state: MigState) -> DeviceFeature:
        return cls(FEATURE_HEADER_SIZE + _STATE.size, request.flags, _STATE.pack(state, NO_DATA_FD))

    # Readers for the data of a feature.

    def migration_flags(self) -> int:
        """The ``u64 flags`` of a MIGRATION GET reply."""
        if len(self.data) < _U64.size:
            raise _short("migration feature data", len(self.data), _U64.size)
        return int(_U64.unpack_from(self.data)[0])

    def device_state(self) -> int:
        """The ``u32 device_state`` of a MIG_DEVICE_STATE request or reply (raw value)."""
        if len(self.data) < _STATE.size:
            raise _short("device state feature data", len(self.data), _STATE.size)
        return int(_STATE.unpack_from(self.data)[0])


# --------------------------------------------------------------------------- MIG_DATA_*


@dataclass(frozen=True, slots=True)
class MigDataRead:
    """MIG_DATA_READ request: ``u32 argsz`` (at least 8 + size), ``u32 size``."""

    argsz: int
    size: int

    @classmethod
    def for_size(cls, size: int) -> MigDataRead:
        return cls(MIG_DATA_HEADER_SIZE + size, size)

    def pack(self) -> bytes:
        return _ARGSZ_FLAGS.pack(self.argsz, self.size)

    @classmethod
    def unpack(cls, payload: memoryview) -> MigDataRead:
        if len(payload) < MIG_DATA_HEADER_SIZE:
            raise _short("mig data read", len(payload), MIG_DATA_HEADER_SIZE)
        argsz, size = _ARGSZ_FLAGS.unpack_from(payload)
        return cls(argsz, size)


@dataclass(frozen=True, slots=True)
class MigDataReadReply:
    """MIG_DATA_READ reply: ``u32 argsz, u32 size``, then ``size`` bytes of state.

    libvfio-user sizes the reply for the requested size and may leave zeros after the
    ``size`` valid bytes, so trailing bytes are allowed and dropped.
    """

    argsz: int
    size: int
    data: bytes

    @classmethod
    def of(cls, data: bytes) -> MigDataReadReply:
        return cls(MIG_DATA_HEADER_SIZE + len(data), len(data), data)

    def pack(self) -> bytes:
        return _ARGSZ_FLAGS.pack(self.argsz, self.size) + self.data

    @classmethod
    def unpack(cls, payload: memoryview) -> MigDataReadReply:
        argsz, size, data = _unpack_mig_data(payload, "mig data read reply")
        return cls(argsz, size, data)


@dataclass(frozen=True, slots=True)
class MigDataWrite:
    """MIG_DATA_WRITE request: ``u32 argsz`` (8 + size), ``u32 size``, then the data."""

    argsz: int
    size: int
    data: bytes

    @classmethod
    def of(cls, data: bytes) -> MigDataWrite:
        return cls(MIG_DATA_HEADER_SIZE + len(data), len(data), data)

    def pack(self) -> bytes:
        return _ARGSZ_FLAGS.pack(self.argsz, self.size) + self.data

    @classmethod
    def unpack(cls, payload: memoryview) -> MigDataWrite:
        argsz, size, data = _unpack_mig_data(payload, "mig data write")
        return cls(argsz, size, data)


def _unpack_mig_data(payload: memoryview, what: str) -> tuple[int, int, bytes]:
    if len(payload) < MIG_DATA_HEADER_SIZE:
        raise _short(what, len(payload), MIG_DATA_HEADER_SIZE)
    argsz, size = _ARGSZ_FLAGS.unpack_from(payload)
    room = len(payload) - MIG_DATA_HEADER_SIZE
    if size > room:
        raise ProtocolError(f"{what} size {size} exceeds the {room} bytes of data it carries")
    return argsz, size, bytes(payload[MIG_DATA_HEADER_SIZE : MIG_DATA_HEADER_SIZE + size])


# --------------------------------------------------------------------------- regions


def _region_access(payload: memoryview, what: str) -> tuple[int, int, int]:
    """The ``u64 offset, u32 region, u32 count`` that starts every region access message."""
    if len(payload) < REGION_ACCESS_HEADER_SIZE:
        raise _short(what, len(payload), REGION_ACCESS_HEADER_SIZE)
    offset, region, count = _REGION_ACCESS.unpack_from(payload)
    return offset, region, count


@dataclass(frozen=True, slots=True)
class RegionRead:
    """REGION_READ request: ``u64 offset, u32 region, u32 count``."""

    region: int
    offset: int
    count: int

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionRead:
        offset, region, count = _region_access(payload, "region read")
        return cls(region, offset, count)


@dataclass(frozen=True, slots=True)
class RegionReadReply:
    """REGION_READ reply: the request's fields, then ``count`` bytes."""

    region: int
    offset: int
    count: int
    data: bytes

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionReadReply:
        offset, region, count = _region_access(payload, "region read reply")
        room = len(payload) - REGION_ACCESS_HEADER_SIZE
        if count > room:
            raise ProtocolError(f"region read reply count {count} exceeds its {room} data bytes")
        start = REGION_ACCESS_HEADER_SIZE
        return cls(region, offset, count, bytes(payload[start : start + count]))


@dataclass(frozen=True, slots=True)
class RegionWrite:
    """REGION_WRITE request: ``u64 offset, u32 region, u32 count``, then exactly ``count`` bytes."""

    region: int
    offset: int
    data: bytes

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionWrite:
        offset, region, count = _region_access(payload, "region write")
        room = len(payload) - REGION_ACCESS_HEADER_SIZE
        if count != room:
            raise ProtocolError(f"region write count {count} differs from its {room} data bytes")
        return cls(region, offset, bytes(payload[REGION_ACCESS_HEADER_SIZE:]))


@dataclass(frozen=True, slots=True)
class RegionWriteReply:
    """REGION_WRITE reply: ``u64 offset, u32 region, u32 count`` (bytes written)."""

    region: int
    offset: int
    count: int

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionWriteReply:
        offset, region, count = _region_access(payload, "region write reply")
        return cls(region, offset, count)


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """DEVICE_GET_REGION_INFO request and reply: ``struct vfio_region_info`` (32 bytes).

    A request fills ``argsz`` (room for the reply) and ``index``; a reply may append
    capabilities, which vfiomig does not use and drops.
    """

    argsz: int
    index: int
    flags: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0

    @classmethod
    def request(cls, index: int) -> RegionInfo:
        return cls(REGION_INFO_SIZE, index)

    def pack(self) -> bytes:
        return _REGION_INFO.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )

    @classmethod
    def unpack(cls, payload: memoryview) -> RegionInfo:
        if len(payload) < REGION_INFO_SIZE:
            raise _short("region info", len(payload), REGION_INFO_SIZE)
        argsz, flags, index, cap_offset, size, offset = _REGION_INFO.unpack_from(payload)
        return cls(argsz, index, flags, cap_offset, size, offset)


# --------------------------------------------------------------------------- the rest


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
