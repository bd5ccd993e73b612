"""The exception hierarchy: every error vfiomig raises on purpose.

Each class says who is at fault, so that an operator reading one line knows where to
look: the peer sent bad bytes (`PacketError`), the stream ended early
(`StreamIncompleteError`), nothing moved for too long (`StallError`), the sink failed
(`SinkError`), or someone asked us to stop (`AbortedError`).

Messages follow QEMU's error style: one lowercase phrase, prefixed with the device (or
channel), carrying the bad value and the limit, e.g.
``"0000:00:04.0/vfio/0: packet idx 7 already received"``.
"""

from __future__ import annotations


class VfioMigError(Exception):
    """Base class of every error vfiomig raises on purpose.

    Attributes:
        device: the device's display name (``idstr/instance``) or ``None``.
        idx: the packet index concerned, or ``None``.
    """

    def __init__(self, message: str, *, device: str | None = None, idx: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.device = device
        self.idx = idx

    def __str__(self) -> str:
        return self.message


class PacketError(VfioMigError, ValueError):
    """The peer sent bytes that break the wire format or the reassembly rules."""


class HandshakeError(PacketError):
    """A data channel's MultiFDInit_t handshake was refused (magic, version, uuid, id)."""


class ChannelCountError(HandshakeError):
    """A channel's id is not below the receiver's channel count: the sender opens more
    channels than the receiver was told (QEMU's multifd-channels against --channels)."""


class ConfigStateError(PacketError):
    """The config-state blob is malformed (markers missing) or arrived twice."""


class StreamIncompleteError(VfioMigError):
    """The stream ended early: inside a packet, or with packets still missing."""


class StallError(VfioMigError):
    """No progress was possible for the stall timeout (gate never opened, sender stuck)."""


class SinkError(VfioMigError):
    """Writing to a sink or config target failed; ``__cause__`` holds the ``OSError``.

    Attributes:
        errno: the errno reported by the sink (OS or vfio-user ERROR reply), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        device: str | None = None,
        idx: int | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message, device=device, idx=idx)
        self.errno = errno


class SourceError(VfioMigError):
    """Reading a device's state on the sending side failed; ``__cause__`` holds the
    ``OSError``.

    Attributes:
        errno: the errno the device reported, if any.
    """

    def __init__(
        self, message: str, *, device: str | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message, device=device)
        self.errno = errno


class AbortedError(VfioMigError):
    """The migration was aborted (control ``abort``, another device failed, or a signal)."""


class UsageError(VfioMigError, ValueError):
    """A command-line or library argument is invalid (bad spec, bad address)."""


def os_error_text(exc: BaseException) -> str:
    """``"Broken pipe (errno 32)"`` for an ``OSError`` with an errno, ``str(exc)`` otherwise:
    the cause part of every message about a failed sink, source or channel."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return str(exc)
