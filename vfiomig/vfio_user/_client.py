"""A trio vfio-user client for the migration subset, driving `ClientConnection`.

Every wait (connect, send, reply) is bounded by ``timeout`` and every call may be
cancelled. Errors say who failed: an ERROR reply raises `VfioUserCommandError` (a
`SinkError` carrying the errno), bytes that break the protocol raise `ProtocolError`
(a `PacketError`), a broken socket or a timeout raise `SinkError` with the ``OSError`` as
``__cause__``. After anything but an ERROR reply the client is `broken` and must be
closed: replies may be out of step with requests.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Final

import trio

from vfiomig._core._errors import SinkError
from vfiomig.vfio_user import _fsm
from vfiomig.vfio_user._messages import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    MAJOR,
    MESSAGE_OVERHEAD,
    MIG_DATA_HEADER_SIZE,
    Body,
    Capabilities,
    Command,
    DeviceFeature,
    Empty,
    ErrorReply,
    MigDataRead,
    MigDataReadReply,
    MigState,
    ProtocolError,
    RegionInfo,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    Version,
    command_name,
)
from vfiomig.vfio_user._protocol import Buffer, ClientConnection

DEFAULT_TIMEOUT: Final = 30.0
#: MIG_DATA_WRITEs in flight before the client waits for a reply. 1: a write sent while
#: an earlier one is still unanswered reaches the device even when that earlier one
#: failed, so the device would take bytes past a gap in its stream (libvfio-user keeps
#: taking writes after a failed one; the soak found it). More in flight only hides the
#: round trip, and against vfiomig's own Python server (the bottleneck) 1, 2 and 4
#: measured the same within noise (~200-280 MiB/s, 1 MiB writes, server in another
#: process). A library user may ask for more, knowing that.
DEFAULT_WINDOW: Final = 1
_RECEIVE_SIZE: Final = 64 * 1024
_MIG_DATA_HEAD = MigDataRead  # same ``argsz, size`` layout as the write header


class VfioUserCommandError(SinkError):
    """The server answered a command with an ERROR reply.

    Attributes:
        command: the command number; ``errno``: the server's errno (None if it sent 0).
    """

    def __init__(self, message: str, *, command: int, errno: int | None) -> None:
        super().__init__(message, errno=errno)
        self.command = command


def _describe_errno(errno: int) -> str:
    if errno == 0:
        return "no errno"
    try:
        return f"errno {errno} ({os.strerror(errno)})"
    except ValueError:
        return f"errno {errno}"


class VfioUserClient(trio.abc.AsyncResource):
    """One connection to a vfio-user server, after VERSION negotiation.

    Create with `open_vfio_user_client`. Not safe for concurrent use by several tasks.

    Attributes:
        server_capabilities: what the server's VERSION reply said.
        data_limit: the largest MIG_DATA/REGION transfer, min(ours, the server's).
        broken: True after an error that may leave replies out of step.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        path: str,
        *,
        timeout: float,
        max_data_xfer_size: int,
        window: int,
    ) -> None:
        if window < 1:
            raise ValueError(f"window {window} is below 1")
        self.path = path
        self.timeout = timeout
        self.window = window
        self.max_data_xfer_size = max_data_xfer_size
        self.server_capabilities = Capabilities()
        self.data_limit = max_data_xfer_size
        self.broken = False
        self.bytes_written = 0
        self._stream = stream
        limit = max(max_data_xfer_size, 64 * 1024) + MESSAGE_OVERHEAD
        self._conn = ClientConnection(max_msg_size=limit)
        self._writes: dict[int, tuple[int, int]] = {}  # msg_id -> (stream offset, size)

    # ------------------------------------------------------------------ plumbing

    def _where(self) -> str:
        return f"vfio-user {self.path}"

    def _io_error(self, what: str, exc: BaseException) -> SinkError:
        self.broken = True
        errno = getattr(exc, "errno", None) or _errno.EPIPE
        return SinkError(
            f"{self._where()}: {what} failed ({exc or type(exc).__name__})", errno=errno
        )

    async def _send(self, command: Command, payload: Buffer | Sequence[Buffer]) -> int:
        if self.broken:
            raise SinkError(f"{self._where()}: connection is unusable after an earlier error")
        msg_id, data = self._conn.send(command, payload)
        try:
            with trio.fail_after(self.timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError as exc:
            self.broken = True
            raise SinkError(
                f"{self._where()}: sending {command.name} took longer than {self.timeout} s",
                errno=_errno.ETIMEDOUT,
            ) from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._io_error(f"sending {command.name}", exc) from exc
        except BaseException:
            self.broken = True  # cancelled mid-message: the stream is out of step
            raise
        return msg_id

    async def _next_reply(self) -> tuple[int, int, Body]:
        try:
            with trio.fail_after(self.timeout):
                while True:
                    reply = self._conn.next_reply()
                    if reply is not None:
                        return reply.msg_id, reply.command, reply.body
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        self.broken = True
                        raise SinkError(
                            f"{self._where()}: server closed the connection with "
                            f"{self._conn.pending} replies outstanding",
                            errno=_errno.ECONNRESET,
                        )
                    self._conn.receive_data(data)
        except trio.TooSlowError as exc:
            self.broken = True
            raise SinkError(
                f"{self._where()}: no reply within {self.timeout} s "
                f"({self._conn.pending} outstanding)",
                errno=_errno.ETIMEDOUT,
            ) from exc
        except ProtocolError as exc:
            self.broken = True
            raise ProtocolError(f"{self._where()}: {exc}") from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._io_error("receiving a reply", exc) from exc
        except BaseException:
            self.broken = True
            raise

    def _command_error(self, command: int, errno: int, what: str = "") -> VfioUserCommandError:
        detail = f" ({what})" if what else ""
        return VfioUserCommandError(
            f"{self._where()}: {command_name(command)}{detail} failed with {_describe_errno(errno)}",
            command=command,
            errno=errno or None,
        )

    async def _collect_write(self) -> None:
        msg_id, command, body = await self._next_reply()
        offset, size = self._writes.pop(msg_id, (0, 0))
        if command != Command.MIG_DATA_WRITE:
            self.broken = True
            raise ProtocolError(f"{self._where()}: unexpected {command_name(command)} reply")
        if isinstance(body, ErrorReply):
            raise self._command_error(
                command, body.errno, f"{size} bytes at stream offset {offset}"
            )

    async def flush(self, *, raise_errors: bool = True) -> None:
        """Wait for the reply of every MIG_DATA_WRITE in flight; raise the first error
        (after collecting every reply, so the connection stays in step)."""
        first: VfioUserCommandError | None = None
        while self._writes:
            try:
                await self._collect_write()
            except VfioUserCommandError as exc:
                first = first or exc
        if first is not None and raise_errors:
            raise first

    async def request(self, command: Command, payload: Buffer, what: str = "") -> Body:
        """Send one request and return its reply body; an ERROR reply raises."""
        await self.flush()
        await self._send(command, payload)
        _, got, body = await self._next_reply()
        if isinstance(body, ErrorReply):
            raise self._command_error(got, body.errno, what)
        return body

    # ------------------------------------------------------------------ commands

    async def negotiate(self) -> None:
        """VERSION: advertise our limits, learn the server's."""
        ours = Capabilities(max_msg_fds=1, max_data_xfer_size=self.max_data_xfer_size)
        body = await self.request(Command.VERSION, Version(MAJOR, 0, ours).pack())
        assert isinstance(body, Version)
        if body.major != MAJOR:
            self.broken = True
            raise ProtocolError(f"{self._where()}: server speaks major {body.major} (need {MAJOR})")
        self.server_capabilities = body.capabilities or Capabilities()
        self.data_limit = min(self.max_data_xfer_size, self.server_capabilities.data_xfer_limit)

    async def get_migration_flags(self) -> int:
        """DEVICE_FEATURE GET MIGRATION: the ``u64`` flags (bit 0 STOP_COPY)."""
        body = await self.request(
            Command.DEVICE_FEATURE, DeviceFeature.get_migration().pack(), "GET MIGRATION"
        )
        assert isinstance(body, DeviceFeature)
        try:
            return body.migration_flags()
        except ProtocolError as exc:
            self.broken = True
            raise ProtocolError(f"{self._where()}: {exc}") from None

    async def get_state(self) -> MigState:
        """DEVICE_FEATURE GET MIG_DEVICE_STATE."""
        body = await self.request(
            Command.DEVICE_FEATURE, DeviceFeature.get_state().pack(), "GET MIG_DEVICE_STATE"
        )
        assert isinstance(body, DeviceFeature)
        try:
            raw = body.device_state()
        except ProtocolError as exc:
            raise ProtocolError(f"{self._where()}: {exc}") from None
        if raw not in MigState._value2member_map_:
            raise ProtocolError(f"{self._where()}: device state {raw} is unknown (max 7)")
        return MigState(raw)

    async def set_state(self, target: MigState) -> None:
        """Move to ``target`` one direct arc at a time (RUNNING -> STOP -> RESUMING).

        The path starts from the state the server reports; a server that cannot report
        it gets a single SET of ``target`` and walks the path itself.
        """
        steps = [target]
        try:
            current = await self.get_state()
        except VfioUserCommandError:
            pass
        else:
            path = _fsm.path(current, target)
            if path is None:
                raise SinkError(
                    f"{self._where()}: no way from state {current.name} to {target.name}",
                    errno=_errno.EINVAL,
                )
            steps = path
        for step in steps:
            await self.request(
                Command.DEVICE_FEATURE, DeviceFeature.set_state(step).pack(), f"SET {step.name}"
            )

    async def write_data(self, chunks: Sequence[Buffer], *, limit: int | None = None) -> None:
        """MIG_DATA_WRITE every byte of ``chunks`` in messages of at most `data_limit`
        (and ``limit``, when given).

        Up to `window` writes stay in flight; their errors surface on a later call or in
        `flush`, naming the stream offset of the write that failed.
        """
        cap = self.data_limit if limit is None else max(1, min(limit, self.data_limit))
        for pieces, size in _split(chunks, cap):
            while len(self._writes) >= self.window:
                await self._collect_write()
            head = _MIG_DATA_HEAD(MIG_DATA_HEADER_SIZE + size, size).pack()
            msg_id = await self._send(Command.MIG_DATA_WRITE, [head, *pieces])
            self._writes[msg_id] = (self.bytes_written, size)
            self.bytes_written += size

    async def read_data(self, size: int) -> bytes:
        """One MIG_DATA_READ of up to ``min(size, data_limit)`` bytes; ``b""`` = end."""
        size = min(size, self.data_limit)
        body = await self.request(Command.MIG_DATA_READ, MigDataRead.for_size(size).pack())
        assert isinstance(body, MigDataReadReply)
        if body.size > size:
            self.broken = True
            raise ProtocolError(
                f"{self._where()}: mig data read returned {body.size} bytes (asked {size})"
            )
        return body.data

    async def region_info(self, index: int) -> RegionInfo:
        body = await self.request(
            Command.DEVICE_GET_REGION_INFO, RegionInfo.request(index).pack(), f"region {index}"
        )
        assert isinstance(body, RegionInfo)
        return body

    async def region_read(self, index: int, offset: int, count: int) -> bytes:
        """REGION_READ, split into transfers of at most `data_limit` bytes."""
        out = bytearray()
        while len(out) < count:
            n = min(count - len(out), self.data_limit)
            req = RegionRead(index, offset + len(out), n)
            body = await self.request(Command.REGION_READ, req.pack(), f"region {index}")
            assert isinstance(body, RegionReadReply)
            if body.count != n:
                self.broken = True
                raise ProtocolError(f"{self._where()}: region read returned {body.count} of {n}")
            out += body.data
        return bytes(out)

    async def region_write(self, index: int, offset: int, data: Buffer) -> None:
        """REGION_WRITE, split into transfers of at most `data_limit` bytes."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.data_limit):
            piece = bytes(view[start : start + self.data_limit])
            req = RegionWrite(index, offset + start, piece)
            await self.request(Command.REGION_WRITE, req.pack(), f"region {index}")

    async def reset(self) -> None:
        """DEVICE_RESET."""
        body = await self.request(Command.DEVICE_RESET, Empty().pack())
        assert isinstance(body, Empty)

    async def aclose(self) -> None:
        """Close the socket; idempotent. Replies still in flight are dropped."""
        self.broken = True
        await self._stream.aclose()

    async def __aenter__(self) -> VfioUserClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _split(chunks: Sequence[Buffer], limit: int) -> Iterator[tuple[list[memoryview], int]]:
    """Regroup ``chunks`` into runs of at most ``limit`` bytes, without copying."""
    run: list[memoryview] = []
    size = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            take = min(limit - size, len(view))
            run.append(view[:take])
            size += take
            view = view[take:]
            if size == limit:
                yield run, size
                run, size = [], 0
    if size:
        yield run, size


async def open_vfio_user_client(
    path: str | os.PathLike[str],
    *,
    reply_timeout: float = DEFAULT_TIMEOUT,
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
    window: int = DEFAULT_WINDOW,
) -> VfioUserClient:
    """Connect to the vfio-user server at ``path`` and negotiate VERSION.

    ``reply_timeout`` bounds every single wait of the client's life: the connect, each
    send and each reply. ``max_data_xfer_size`` is what we advertise (libvfio-user bounds MIG_DATA_* by it) and
    the most we send in one message.

    Cancellation: safe; a half-open connection is closed.
    """
    path = os.fspath(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(reply_timeout):
            await sock.connect(path)
    except trio.TooSlowError as exc:
        sock.close()
        raise SinkError(
            f"vfio-user {path}: connect took longer than {reply_timeout} s", errno=_errno.ETIMEDOUT
        ) from exc
    except OSError as exc:
        sock.close()
        raise SinkError(f"vfio-user {path}: connect failed ({exc})", errno=exc.errno) from exc
    except BaseException:
        sock.close()
        raise
    client = VfioUserClient(
        trio.SocketStream(sock),
        path,
        timeout=reply_timeout,
        max_data_xfer_size=max_data_xfer_size,
        window=window,
    )
    try:
        await client.negotiate()
    except BaseException:
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise
    return client
