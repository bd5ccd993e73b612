"""VERSION: the first message of a connection, and the capabilities it negotiates (sans-IO)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Final

from vfiomig.vfio_user._header import MAJOR, ProtocolError, short

#: Spec default for ``max_data_xfer_size`` and libvfio-user's own limit.
DEFAULT_MAX_DATA_XFER_SIZE: Final = 1024 * 1024
DEFAULT_PGSIZE: Final = 4096
_VERSION = struct.Struct("=HH")


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
    #: REGION_WRITE_MULTI is understood (QEMU's client batches posted writes with it).
    write_multiple: bool | None = None

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
        if self.write_multiple is not None:
            caps["write_multiple"] = self.write_multiple
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
        multi = caps.get("write_multiple")
        if multi is not None and not isinstance(multi, bool):
            raise ProtocolError(f"version field write_multiple is a json {type(multi).__name__}")
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
            write_multiple=multi,
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
            raise short("version", len(payload), _VERSION.size)
        major, minor = _VERSION.unpack_from(payload)
        raw = bytes(payload[_VERSION.size :])
        caps = Capabilities.from_json(raw) if raw.strip(b"\0") else None
        return cls(major, minor, caps)
