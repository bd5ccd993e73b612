"""The vfio-user message header and command numbers, and the codec's one error (sans-IO).

Everything in the codec is in host byte order, as the vfio-user spec (v0.9.2) says, and
packed. Each body class (in `_version`, `_migration_bodies`, `_layouts`) packs itself into
payload bytes (the part after this 16-byte header) and unpacks from them; `unpack` checks
every length before it slices, and raises `ProtocolError` for anything malformed, never
another exception.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from vfiomig._core._errors import PacketError


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
HEADER: Final = struct.Struct("=HHIII")
#: SO_SNDBUF of client and server (capped at wmem_max): room for a window of MIG_DATA_*.
SEND_BUFFER: Final = 4 * 1024 * 1024
MAJOR: Final = 0

# Header flags.
FLAG_TYPE_MASK: Final = 0xF
FLAG_TYPE_COMMAND: Final = 0
FLAG_TYPE_REPLY: Final = 1
FLAG_NO_REPLY: Final = 0x10
FLAG_ERROR: Final = 0x20


def short(what: str, got: int, need: int) -> ProtocolError:
    """The error for a payload shorter than its layout."""
    return ProtocolError(f"{what} payload of {got} bytes is too short (min {need})")
