"""The vfio-user connection state machines, without I/O (h11-style, sans-IO).

A connection is fed whatever bytes arrived (``receive_data``; ``b""`` means the peer
closed) and hands out whole messages. ``next_reply`` / ``next_request`` are the only
places that raise the peer-error family (`ProtocolError`); after one such error the
object is poisoned and refuses further input, so a caller cannot act on a stream whose
framing is lost. Sending is the other way round: ``send`` returns the bytes to write.

Framing is checked before anything is buffered: ``msg_size`` below the 16-byte header is
fatal (the stream cannot be framed any more); a ``msg_size`` above the limit is skipped
without buffering its payload and reported as `Malformed`, so a server can answer it
with EINVAL and carry on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from vfiomig.vfio_user._header import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER,
    HEADER_SIZE,
    Command,
    ProtocolError,
    command_name,
)
from vfiomig.vfio_user._messages import Body, ErrorReply, Malformed, decode_body

Buffer = bytes | bytearray | memoryview

#: The largest message accepted by default: 1 MiB of data plus headers (libvfio-user's
#: ``SERVER_MAX_MSG_SIZE`` is 1 MiB + 32).
DEFAULT_MAX_MSG_SIZE: Final = 1024 * 1024 + 32
#: The requests a server sends its client (spec: "Server to client").
SERVER_REQUESTS: Final = frozenset({Command.DMA_READ, Command.DMA_WRITE})


@dataclass(frozen=True, slots=True)
class Header:
    """``struct vfio_user_header``: 16 bytes in host byte order."""

    msg_id: int
    command: int
    msg_size: int
    flags: int = 0
    error_no: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    def pack(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.msg_size, self.flags, self.error_no)


@dataclass(frozen=True, slots=True)
class Message:
    """One received message: its header and decoded body (possibly `Malformed`)."""

    header: Header
    body: Body

    @property
    def msg_id(self) -> int:
        return self.header.msg_id

    @property
    def command(self) -> int:
        return self.header.command


def encode_message(
    msg_id: int,
    command: int,
    payload: Buffer | Sequence[Buffer],
    *,
    reply: bool = False,
    error_no: int | None = None,
    no_reply: bool = False,
) -> bytes:
    """Build one whole message: header then payload (one buffer or several, concatenated)."""
    parts = [payload] if isinstance(payload, bytes | bytearray | memoryview) else list(payload)
    size = HEADER_SIZE + sum(memoryview(p).nbytes for p in parts)
    if size > 0xFFFFFFFF:
        raise ValueError(f"message size {size} does not fit in u32")
    flags = FLAG_TYPE_REPLY if reply else 0
    if error_no is not None:
        flags |= FLAG_ERROR
    if no_reply:
        flags |= FLAG_NO_REPLY
    head = HEADER.pack(msg_id & 0xFFFF, command, size, flags, error_no or 0)
    return b"".join([head, *parts])


class _Framer:
    """Splits a byte stream into (header, payload) pairs within a size limit."""

    def __init__(self, max_msg_size: int) -> None:
        if max_msg_size < HEADER_SIZE:
            raise ValueError(f"max_msg_size {max_msg_size} is below the header size {HEADER_SIZE}")
        self.max_msg_size = max_msg_size
        self._buf = bytearray()
        self._skip = 0  # payload bytes of an oversized message still to drop
        self._skipped: Header | None = None
        self._eof = False
        self._error: ProtocolError | None = None

    def receive_data(self, data: Buffer) -> None:
        if self._error is not None:
            raise ProtocolError(f"connection is unusable after an error ({self._error})")
        if self._eof and data:
            raise RuntimeError("receive_data after the end of the stream")
        if not data:
            self._eof = True
            return
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        self._buf += view

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def poison(self, exc: ProtocolError) -> ProtocolError:
        """Refuse further input after ``exc``; returns it for ``raise``."""
        self._error = exc
        return exc

    def next_frame(self) -> Message | None:
        """The next whole message, or None if more bytes are needed."""
        if self._error is not None:
            raise ProtocolError(f"connection is unusable after an error ({self._error})")
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Message | None:
        if self._skipped is not None:
            if self._skip:
                return self._need_more()
            head, self._skipped = self._skipped, None
            return Message(
                head,
                Malformed(
                    f"{command_name(head.command)} message size {head.msg_size} "
                    f"exceeds the limit {self.max_msg_size}"
                ),
            )
        if len(self._buf) < HEADER_SIZE:
            return self._need_more()
        head = Header(*HEADER.unpack_from(self._buf))
        if head.msg_size < HEADER_SIZE:
            raise ProtocolError(
                f"{command_name(head.command)} message size {head.msg_size} "
                f"is below the header size {HEADER_SIZE}"
            )
        if head.msg_size > self.max_msg_size:
            # Drop the payload as it arrives instead of buffering it.
            available = len(self._buf) - HEADER_SIZE
            dropped = min(available, head.msg_size - HEADER_SIZE)
            del self._buf[: HEADER_SIZE + dropped]
            self._skip = head.msg_size - HEADER_SIZE - dropped
            self._skipped = head
            return self._next()
        if len(self._buf) < head.msg_size:
            return self._need_more()
        payload = memoryview(bytes(self._buf[HEADER_SIZE : head.msg_size]))
        del self._buf[: head.msg_size]
        body = decode_body(
            head.command,
            reply=head.is_reply,
            error=head.is_error,
            error_no=head.error_no,
            payload=payload,
        )
        return Message(head, body)

    def _need_more(self) -> Message | None:
        """None (wait for more bytes), unless the peer closed inside a message."""
        if self._eof and (self._buf or self._skip):
            raise ProtocolError(
                f"connection closed inside a message with {len(self._buf)} bytes buffered"
            )
        return None


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply matched to the request it answers."""

    msg_id: int
    command: int
    body: Body


class ClientConnection:
    """The client side: numbers requests, matches replies to them by ``msg_id``.

    Several requests may be outstanding (pipelining); replies may come in any order.
    """

    def __init__(self, *, max_msg_size: int = DEFAULT_MAX_MSG_SIZE) -> None:
        self._framer = _Framer(max_msg_size)
        self._pending: dict[int, int] = {}  # msg_id -> command
        self._next_id = 0

    @property
    def pending(self) -> int:
        """How many requests wait for their reply."""
        return len(self._pending)

    def send(self, command: int, payload: Buffer | Sequence[Buffer]) -> tuple[int, bytes]:
        """Number a request and return ``(msg_id, bytes to write)``."""
        if len(self._pending) >= 0x10000:
            raise RuntimeError("every msg_id is in use")
        while self._next_id in self._pending:
            self._next_id = (self._next_id + 1) & 0xFFFF
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        data = encode_message(msg_id, command, payload)
        self._pending[msg_id] = command
        return msg_id, data

    def unsent(self, msg_id: int) -> None:
        """Forget request ``msg_id``: none of its bytes went out (a cancelled send)."""
        self._pending.pop(msg_id, None)

    def receive_data(self, data: Buffer) -> None:
        """Feed received bytes; ``b""`` means the server closed the connection."""
        self._framer.receive_data(data)

    @property
    def buffered(self) -> int:
        """Received bytes not handed out yet (the start of the next message)."""
        return self._framer.buffered

    def next_reply(self) -> Reply | None:
        """The next reply, or None if more bytes are needed.

        Raises:
            ProtocolError: broken framing, a command instead of a reply, a reply to no
                outstanding request or with another command, a malformed body, or the
                server closed the connection while replies were outstanding.
        """
        event = self.next_event(requests=False)
        assert not isinstance(event, Message)
        return event

    def next_event(self, *, requests: bool = True) -> Reply | Message | None:
        """The next reply, or (with ``requests``) the next request the server sends us
        (DMA_READ / DMA_WRITE: a `Message` with an `Opaque` body), or None if more bytes
        are needed. Raises like `next_reply`; any other request from the server breaks
        the protocol."""
        msg = self._framer.next_frame()
        if msg is None:
            if self._framer.eof and self._pending:
                raise self._framer.poison(
                    ProtocolError(
                        f"server closed the connection with {len(self._pending)} "
                        "replies outstanding"
                    )
                )
            return None
        try:
            if requests and not msg.header.is_reply and msg.command in SERVER_REQUESTS:
                return msg
            return self._match(msg)
        except ProtocolError as exc:
            raise self._framer.poison(exc) from None

    def _match(self, msg: Message) -> Reply:
        head = msg.header
        name = command_name(head.command)
        if not head.is_reply:
            raise ProtocolError(
                f"server sent {name} msg_id {head.msg_id} with flags {head.flags:#x}, not a reply"
            )
        expected = self._pending.get(head.msg_id)
        if expected is None:
            raise ProtocolError(
                f"server sent a {name} reply to msg_id {head.msg_id}, which is not outstanding"
            )
        if expected != head.command:
            raise ProtocolError(
                f"server sent a {name} reply to msg_id {head.msg_id} "
                f"(expected {command_name(expected)})"
            )
        del self._pending[head.msg_id]
        if isinstance(msg.body, Malformed):
            raise ProtocolError(f"server sent a malformed {name} reply: {msg.body.reason}")
        return Reply(head.msg_id, head.command, msg.body)


class ServerConnection:
    """The server side: hands out requests, encodes replies and error replies."""

    def __init__(self, *, max_msg_size: int = DEFAULT_MAX_MSG_SIZE) -> None:
        self._framer = _Framer(max_msg_size)

    @property
    def max_msg_size(self) -> int:
        return self._framer.max_msg_size

    @property
    def closed(self) -> bool:
        """True once the client closed its side and every whole message was handed out."""
        return self._framer.eof and self._framer.buffered == 0

    def receive_data(self, data: Buffer) -> None:
        """Feed received bytes; ``b""`` means the client closed the connection."""
        self._framer.receive_data(data)

    def next_request(self) -> Message | None:
        """The next request (its body may be `Malformed`: answer EINVAL), or None.

        Raises:
            ProtocolError: the stream cannot be framed (size below the header, closed
                inside a message) or the client sent a reply.
        """
        msg = self._framer.next_frame()
        if msg is not None and msg.header.is_reply:
            raise self._framer.poison(
                ProtocolError(
                    f"client sent a {command_name(msg.command)} reply (msg_id {msg.msg_id}), "
                    "but vfiomig's server sends no requests"
                )
            )
        return msg

    @staticmethod
    def reply(request: Message, payload: Buffer | Sequence[Buffer]) -> bytes:
        return encode_message(request.msg_id, request.command, payload, reply=True)

    @staticmethod
    def error(request: Message, errno: int) -> bytes:
        return encode_message(request.msg_id, request.command, b"", reply=True, error_no=errno)


__all__ = [
    "DEFAULT_MAX_MSG_SIZE",
    "ClientConnection",
    "ErrorReply",
    "Header",
    "Message",
    "Reply",
    "SERVER_REQUESTS",
    "ServerConnection",
    "encode_message",
]
