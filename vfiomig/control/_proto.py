"""The control channel's wire format (SPEC.md §3), sans-IO: bytes and fds in, messages out.

A control stream is a sequence of msgpack maps, each with a ``"type"`` key. `ControlDecoder`
is the only place where peer bytes enter; it raises `ControlFramingError` (a `PacketError`)
for bytes that are not msgpack or a message above the size limit, and is poisoned after
that: the stream cannot be resynchronised, so the connection must be closed. A message that
is valid msgpack but not a valid message (not a map, no ``"type"``, a field of the wrong
type) raises `ControlMessageError` instead and leaves the decoder usable: the peer gets an
``error`` reply and the message is ignored. An unknown ``"type"`` decodes to `Unknown`.

File descriptors (``attach-fd``) travel as SCM_RIGHTS. The kernel attaches them to the
first byte of the sender's ``sendmsg`` and hands them out with whichever receive reads that
byte, together with the bytes of any messages sent before it (a peer that sends ``hello``
and then ``attach-fd`` without waiting for the reply gets both in one receive, with the
fd), or with only the first piece of a message split across sends. So where an fd arrives
says little about its message; the order says everything: SPEC.md §3 gives the fds, in the
order received, to the messages that carry fds (``attach-fd``, one each), in the order
decoded. A message of another type never takes one. `ControlDecoder.feed` queues the fds;
each ``attach-fd`` (valid or not: a malformed one still carried its fd) takes the oldest.
Fds beyond `MAX_UNCLAIMED` waiting for their message, and those of a poisoned decoder, are
handed back in `ControlDecoder.orphans` for the I/O layer to close (with a warning naming
the connection); this module never closes an fd.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import msgpack

from vfiomig._core._errors import PacketError

VERSION = 1

#: Largest encoded message accepted by default; a ``precopy`` message carries one chunk
#: of main-channel state, which QEMU's VFIO code sends in pieces far smaller than this.
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024

#: Text fields (device idstr, reason, type) are short; bound them so garbage cannot make
#: the decoder build huge strings, lists or maps.
_MAX_STR = 64 * 1024
_MAX_CONTAINER = 64

ATTACH_KINDS = ("data", "vfio-device")

#: fds received and not yet claimed by an ``attach-fd``, at most; older ones are orphans.
#: A peer sends an fd at the latest with its message's last byte, so only the fds of
#: messages still in flight wait here.
MAX_UNCLAIMED = 16


class ControlFramingError(PacketError):
    """The control stream is not msgpack, or a message is too large: close the connection."""


class ControlMessageError(PacketError):
    """A well-framed message is not a valid control message: reply ``error``, go on."""


@dataclass(frozen=True, slots=True)
class Hello:
    version: int


@dataclass(frozen=True, slots=True)
class Precopy:
    device: str
    instance: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DataComplete:
    device: str
    instance: int


@dataclass(frozen=True, slots=True)
class SwitchoverStart:
    pass


@dataclass(frozen=True, slots=True)
class AttachFd:
    device: str
    instance: int
    kind: str
    fds: tuple[int, ...] = ()  # the fds that came with it; the receiver owns them


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str


@dataclass(frozen=True, slots=True)
class Unknown:
    type: str


Message: TypeAlias = Hello | Precopy | DataComplete | SwitchoverStart | AttachFd | Abort | Unknown


def _field(msg: dict[str, Any], kind: str, name: str, types: type | tuple[type, ...]) -> Any:
    if name not in msg:
        raise ControlMessageError(f"{kind} message lacks field {name!r}")
    value = msg[name]
    # bool is an int in Python; no field here takes a bool.
    if not isinstance(value, types) or isinstance(value, bool):
        raise ControlMessageError(f"{kind} message field {name!r} has type {type(value).__name__}")
    return value


def _device(msg: dict[str, Any], kind: str) -> tuple[str, int]:
    device = _field(msg, kind, "device", str)
    instance = _field(msg, kind, "instance", int)
    if not 0 <= instance <= 0xFFFFFFFF:
        raise ControlMessageError(f"{kind} message instance {instance} is out of range")
    return device, instance


def parse_message(obj: object, fds: tuple[int, ...] = ()) -> Message:
    """Turn one decoded msgpack object into a message.

    Raises:
        ControlMessageError: not a map, no string ``type``, a field missing or mistyped.
    """
    if not isinstance(obj, dict):
        raise ControlMessageError(f"control message is a {type(obj).__name__}, not a map")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ControlMessageError("control message has no string field 'type'")
    if kind == "hello":
        return Hello(_field(obj, kind, "version", int))
    if kind == "precopy":
        device, instance = _device(obj, kind)
        return Precopy(device, instance, _field(obj, kind, "data", bytes))
    if kind == "data-complete":
        return DataComplete(*_device(obj, kind))
    if kind == "switchover-start":
        return SwitchoverStart()
    if kind == "attach-fd":
        device, instance = _device(obj, kind)
        fd_kind = _field(obj, kind, "kind", str)
        if fd_kind not in ATTACH_KINDS:
            raise ControlMessageError(f"attach-fd message kind {fd_kind!r} is unknown")
        return AttachFd(device, instance, fd_kind, fds)
    if kind == "abort":
        return Abort(_field(obj, kind, "reason", str))
    return Unknown(kind[:64])


class ControlDecoder:
    """Splits a control byte stream into messages.

    Call `feed` with received bytes (and any fds that came with them), then `next_message`
    until it returns None. After `ControlFramingError` the decoder refuses further input.
    """

    def __init__(self, *, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            max_buffer_size=2 * max_message + 1024,
            max_bin_len=max_message,
            max_str_len=_MAX_STR,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
        self._fed = 0  # bytes fed so far: the stream offset of the next feed
        # Where the next message starts. (The unpacker's ``tell`` also counts the bytes of
        # a message it has only partly parsed, so it is read only after a whole one.)
        self._start = 0
        self._fds: deque[int] = deque()  # received, not yet claimed, oldest first
        self._error: ControlFramingError | None = None
        #: fds no message can claim any more; the caller closes them.
        self.orphans: list[int] = []

    def feed(self, data: bytes | bytearray, fds: Sequence[int] = ()) -> None:
        """Add received bytes; ``fds`` are the ones that came with them (now ours).

        Raises:
            ControlFramingError: poisoned, or the buffered message exceeds the limit.
        """
        if self._error is not None:
            self.orphans.extend(fds)
            raise self._error
        self._fds.extend(fds)
        while len(self._fds) > MAX_UNCLAIMED:
            self.orphans.append(self._fds.popleft())
        self._fed += len(data)
        if not data:
            return
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            self._poison(f"control message above a size limit ({self.max_message} bytes)")

    def next_message(self) -> Message | None:
        """The next message, or None when more bytes are needed.

        Raises:
            ControlFramingError: the bytes are not msgpack or a message is too large.
            ControlMessageError: a message is malformed (the decoder stays usable).
        """
        if self._error is not None:
            raise self._error
        try:
            obj = next(self._unpacker)
        except StopIteration:
            self._check_partial()
            return None
        except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
            # msgpack's errors for bad bytes: FormatError, StackError, ExtraData, and
            # ValueError for a length above a limit or invalid UTF-8.
            if "exceeds max_" in str(exc):
                self._poison(f"control message above a size limit ({exc})")
            self._poison(f"control stream is not valid msgpack: {exc}")
        self._start = self._unpacker.tell()
        # The message's fd, claimed before it is validated: a malformed attach-fd still
        # carried one, which must not shift to the next attach-fd.
        carries = isinstance(obj, dict) and obj.get("type") == "attach-fd"
        fds = (self._fds.popleft(),) if carries and self._fds else ()
        try:
            return parse_message(obj, fds)
        except ControlMessageError:
            self.orphans.extend(fds)
            raise

    @property
    def pending_fds(self) -> list[int]:
        """Every fd received and not yet claimed (to close when the connection ends)."""
        return list(self._fds)

    def _check_partial(self) -> None:
        # A message still incomplete with more than the limit buffered can never fit.
        if self._fed - self._start > self.max_message:
            self._poison(f"control message above a size limit ({self.max_message} bytes)")

    def _poison(self, message: str) -> NoReturn:
        self._error = ControlFramingError(message)
        self.orphans.extend(self._fds)
        self._fds.clear()
        raise self._error


def encode(message: dict[str, Any]) -> bytes:
    """Encode one outgoing message (an event, or a peer's command)."""
    out = msgpack.packb(message, use_bin_type=True)
    assert isinstance(out, bytes)
    return out
