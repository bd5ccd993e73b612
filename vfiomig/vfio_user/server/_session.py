"""What the server's request handlers share: the session, the reply, the reasons."""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import Final

from vfiomig.vfio_user._version import DEFAULT_MAX_DATA_XFER_SIZE

Buffer = bytes | bytearray | memoryview

#: libvfio-user's ``LIB_VFIO_USER_MINOR``.
MINOR: Final = 2
#: libvfio-user's SERVER_MAX_FDS.
DEFAULT_MAX_MSG_FDS: Final = 8
#: The most fds a client may say it accepts (VFIO_USER_CLIENT_MAX_MSG_FDS_LIMIT).
CLIENT_MAX_FDS_LIMIT: Final = 1024


class ResetReason(enum.Enum):
    """Why the reset callback runs."""

    DEVICE_RESET = "device-reset"  # the client sent DEVICE_RESET
    LOST_CONNECTION = "lost-connection"  # the client went away (see reset_on_disconnect)
    #: The client set Initiate FLR in the PCI Express capability (``VFU_RESET_PCI_FLR``).
    PCI_FLR = "pci-flr"
    #: A MIG_DATA_WRITE body received into the emulator's `WriteBuffer` did not arrive
    #: whole: the stream has a hole, the state loaded so far must go.
    TORN_WRITE = "torn-write"


@dataclass(slots=True)
class Session:
    """What one connection negotiated; a new connection starts a new session."""

    negotiated: bool = False
    client_max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    client_max_msg_fds: int = 1


@dataclass(slots=True)
class Reply:
    """The answer to one request: payload parts, fds to attach (borrowed, not closed)."""

    parts: list[Buffer] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


class EmulatorError(OSError):
    """An ``OSError`` the emulator raised in one of its callbacks (``what``: which, and
    the emulator's own text): the client gets its errno, the server logs it at WARNING."""


def emulator_error(exc: OSError, what: str) -> EmulatorError:
    """``exc`` from the emulator's ``what`` callback as an `EmulatorError` (cause kept)."""
    text = exc.strerror if exc.strerror else str(exc)
    error = EmulatorError(
        exc.errno if exc.errno and exc.errno > 0 else errno.EIO, f"{what}: {text}"
    )
    error.__cause__ = exc
    return error


class CloseConnection(Exception):
    """Reply with ``errno`` and then drop the client (a bad first VERSION)."""

    def __init__(self, errno_: int, text: str) -> None:
        super().__init__(text)
        self.errno = errno_
