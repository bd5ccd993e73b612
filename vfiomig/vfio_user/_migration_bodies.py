"""The migration bodies: DEVICE_FEATURE (MIGRATION, MIG_DEVICE_STATE) and MIG_DATA_* (sans-IO).

Requests and replies that share a layout (DEVICE_FEATURE) share a class; MIG_DATA_READ
has one class per direction, because the same command carries different fields each
way (the request asks for ``size`` bytes, the reply carries them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vfiomig._core._migstate import MigState as MigState
from vfiomig.vfio_user._header import HEADER_SIZE, Command, ProtocolError, short

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

_ARGSZ_FLAGS = struct.Struct("=II")  # DEVICE_FEATURE header and MIG_DATA_* header alike
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")  # device_state, data_fd
FEATURE_HEADER_SIZE: Final = _ARGSZ_FLAGS.size
MIG_DATA_HEADER_SIZE: Final = _ARGSZ_FLAGS.size
#: A MIG_DATA_* message's header and argsz/size, as the pipelines and the server's
#: receive path write and parse them in one piece.
DATA_HEAD: Final = struct.Struct("=HHIIIII")
DATA_HEAD_SIZE: Final = DATA_HEAD.size
MIG_SIZES: Final = struct.Struct("=II")
WRITE: Final = int(Command.MIG_DATA_WRITE)
READ: Final = int(Command.MIG_DATA_READ)
assert DATA_HEAD_SIZE == HEADER_SIZE + MIG_DATA_HEADER_SIZE


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
            raise short("device feature", len(payload), FEATURE_HEADER_SIZE)
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

    # Readers for the data of a feature.

    def migration_flags(self) -> int:
        """The ``u64 flags`` of a MIGRATION GET reply."""
        if len(self.data) < _U64.size:
            raise short("migration feature data", len(self.data), _U64.size)
        return int(_U64.unpack_from(self.data)[0])

    def device_state(self) -> int:
        """The ``u32 device_state`` of a MIG_DEVICE_STATE request or reply (raw value)."""
        if len(self.data) < _STATE.size:
            raise short("device state feature data", len(self.data), _STATE.size)
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
            raise short("mig data read", len(payload), MIG_DATA_HEADER_SIZE)
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
        raise short(what, len(payload), MIG_DATA_HEADER_SIZE)
    argsz, size = _ARGSZ_FLAGS.unpack_from(payload)
    room = len(payload) - MIG_DATA_HEADER_SIZE
    if size > room:
        raise ProtocolError(f"{what} size {size} exceeds the {room} bytes of data it carries")
    return argsz, size, bytes(payload[MIG_DATA_HEADER_SIZE : MIG_DATA_HEADER_SIZE + size])


# --------------------------------------------------------------------------- regions
