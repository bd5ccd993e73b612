"""A trio vfio-user client, the VMM's side of the protocol: requests on a `Channel` (fds
both ways, the server's DMA requests answered from `GuestMemory`), the device calls of
`DeviceCalls`, migration (state changes, MIG_DATA_WRITE / MIG_DATA_READ pipelines), region
access and reset.

Every wait (connect, send, reply) is bounded by ``timeout`` and every call may be
cancelled. Errors say who failed: an ERROR reply raises `VfioUserCommandError` (a
`SinkError` carrying the errno), bytes that break the protocol raise `ProtocolError`
(a `PacketError`), a broken socket or a timeout raise `SinkError` with the ``OSError`` as
``__cause__``. After anything but an ERROR reply the client is `broken` and must be
closed: replies may be out of step with requests.
"""

from __future__ import annotations

import errno as _errno
import math
import os
import socket
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Final

import trio

from vfiomig._core._errors import SinkError
from vfiomig.transport import close_fds
from vfiomig.vfio_user import _fsm
from vfiomig.vfio_user._header import MAJOR, SEND_BUFFER, Command, ProtocolError, command_name
from vfiomig.vfio_user._layouts import (
    MESSAGE_OVERHEAD,
    RegionInfo,
    RegionRead,
    RegionReadReply,
    RegionWrite,
)
from vfiomig.vfio_user._messages import Body, Empty, ErrorReply
from vfiomig.vfio_user._migration_bodies import (
    MIG_DATA_HEADER_SIZE,
    MIG_SIZES,
    DeviceFeature,
    MigDataRead,
    MigDataReadReply,
    MigState,
)
from vfiomig.vfio_user._protocol import Buffer
from vfiomig.vfio_user._version import DEFAULT_MAX_DATA_XFER_SIZE, Capabilities, Version
from vfiomig.vfio_user.client._channel import Channel
from vfiomig.vfio_user.client._device_calls import DeviceCalls
from vfiomig.vfio_user.client._guest_memory import GuestMemory
from vfiomig.vfio_user.client._native_read import native_read_error
from vfiomig.vfio_user.client._pipeline import (
    Tag,
    VfioUserCommandError,
    WriteFailed,
    WritePipeline,
    describe_errno,
)
from vfiomig.vfio_user.client._read_pipeline import ReadPipeline

DEFAULT_TIMEOUT: Final = 30.0
#: MIG_DATA_WRITE/READ bytes in flight by default: the window is this many bytes' worth of
#: messages (at least 2, at most 64). The spec lets a client pipeline commands and
#: servers process them in order; a write sent behind a refused one still reaches the
#: device, which is why a sink resets a device whose stream failed (see `_sink`).
WINDOW_BYTES: Final = 8 * 1024 * 1024


def default_window(message_size: int) -> int:
    """How many MIG_DATA messages of ``message_size`` bytes stay in flight by default."""
    return max(2, min(256, WINDOW_BYTES // max(1, message_size)))


class VfioUserClient(DeviceCalls, trio.abc.AsyncResource):
    """One connection to a vfio-user server, after VERSION negotiation.

    Create with `open_vfio_user_client`. Several tasks may have requests outstanding at once
    (see `_channel`); the MIG_DATA pipelines (`write_data`, `read_stream`) want the socket
    to themselves and go one message at a time while `serve_requests` runs or other requests
    are outstanding. An idle client may lend its socket to the C send path's reader for the
    STOP_COPY stream (`native_read`, `native_read_ended`). The device side of the protocol
    (`device_info`, `region`, `map_region`, `irq_info`, `set_irq_eventfds`, `map_dma`, the
    DMA logging calls) comes from `_device_calls.DeviceCalls`.

    Attributes:
        server_capabilities: what the server's VERSION reply said.
        data_limit: the largest MIG_DATA/REGION transfer, min(ours, the server's).
        broken: True after an error that may leave replies out of step.
        guest: the guest memory this client provides (`map_dma`), which answers the
            server's DMA_READ / DMA_WRITE.
    """

    def __init__(
        self,
        sock: socket.socket,
        path: str,
        *,
        timeout: float,
        max_data_xfer_size: int,
        window: int | None,
        max_msg_fds: int = 1,
    ) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window {window} is below 1")
        self.path = path
        self.timeout = timeout
        self.window = window
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds
        self.server_capabilities = Capabilities()
        self.data_limit = max_data_xfer_size
        self._sock = sock
        limit = max(max_data_xfer_size, 64 * 1024) + MESSAGE_OVERHEAD
        self._channel = Channel(sock, self._where(), timeout=timeout, max_msg_size=limit)
        self.guest = GuestMemory(max_count=max_data_xfer_size)
        self._channel.on_request = self.guest.serve
        self._interrupts = []
        self._mapped = []
        self._io_fds = []
        self._writer: WritePipeline | None = None
        self._reader: ReadPipeline | None = None

    @property
    def broken(self) -> bool:
        """True after an error that may leave replies out of step."""
        return self._channel.broken or any(
            p is not None and p.broken for p in (self._writer, self._reader)
        )

    @broken.setter
    def broken(self, value: bool) -> None:
        self._channel.broken = value

    @property
    def bytes_written(self) -> int:
        """MIG_DATA_WRITE bytes sent on this connection."""
        return 0 if self._writer is None else self._writer.offset

    @property
    def requests_served(self) -> int:
        """DMA_READ / DMA_WRITE requests of the server answered (served or refused)."""
        return self._channel.requests_served

    # ------------------------------------------------------------------ plumbing

    def _where(self) -> str:
        return f"vfio-user {self.path}"

    def _command_error(self, command: int, errno: int, what: str = "") -> VfioUserCommandError:
        detail = f" ({what})" if what else ""
        return VfioUserCommandError(
            f"{self._where()}: {command_name(command)}{detail} failed with {describe_errno(errno)}",
            command=command,
            errno=errno or None,
        )

    async def serve_requests(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Answer the server's DMA_READ / DMA_WRITE from `guest` for as long as the
        connection lives (run it in a nursery: ``await nursery.start(client.serve_requests)``).
        Without it they are answered only while some request waits for its reply.

        Cancellation: safe; it waits between messages.
        """
        await self._channel.serve(task_status=task_status)

    async def flush(self, *, raise_errors: bool = True) -> None:
        """Wait for the reply of every MIG_DATA_WRITE in flight and collect the replies
        of reads sent past the end of the stream; raise the first refused write's
        `WriteFailed` (again on every call), unless ``raise_errors`` is false."""
        if self._reader is not None:
            reader, self._reader = self._reader, None
            try:
                await reader.drain()
            except BaseException as exc:  # replies still owed: out of step for good
                self._channel.fail(exc)
                raise
        if self._writer is not None:
            try:
                await self._writer.flush()
            except WriteFailed:
                if raise_errors:
                    raise

    async def request(
        self, command: Command, payload: Buffer | Sequence[Buffer], what: str = ""
    ) -> Body:
        """Send one request and return its reply body; an ERROR reply raises.

        MIG_DATA messages still in flight are answered first; a refused write raises.
        """
        body, fds = await self.request_fds(command, payload, what=what)
        close_fds(fds)
        return body

    async def request_fds(
        self,
        command: Command,
        payload: Buffer | Sequence[Buffer],
        fds: Sequence[int] = (),
        *,
        what: str = "",
    ) -> tuple[Body, list[int]]:
        """`request` with ``fds`` sent along, returning the fds its reply carried too
        (the caller's to close)."""
        if self._reader is not None or (self._writer is not None and self._writer.pending):
            await self.flush()
        for pipeline in (self._writer, self._reader):
            if pipeline is not None and pipeline.broken:
                self._channel.fail(SinkError(f"{self._where()}: a pipelined request failed"))
        msg_id = await self._channel.send(command, payload, fds)
        reply, got_fds = await self._channel.reply(msg_id, what or command.name)
        if isinstance(reply.body, ErrorReply):
            close_fds(got_fds)
            raise self._command_error(reply.command, reply.body.errno, what)
        return reply.body, got_fds

    # ------------------------------------------------------------------ commands

    async def negotiate(self) -> None:
        """VERSION: advertise our limits, learn the server's."""
        ours = Capabilities(
            max_msg_fds=self.max_msg_fds, max_data_xfer_size=self.max_data_xfer_size
        )
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

    async def write_data(
        self,
        chunks: Sequence[Buffer],
        *,
        limit: int | None = None,
        tag: tuple[int, int] | None = None,
    ) -> None:
        """MIG_DATA_WRITE every byte of ``chunks`` in messages of at most `data_limit`
        (and ``limit``, when given), each in one ``sendmsg``, without copying them.

        Up to `window` writes stay in flight (by default `default_window` of the message
        size); a refused one raises `WriteFailed` on this or a later call or in `flush`,
        naming its stream offset and ``tag`` (the idx range its data came from).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        cap = self.data_limit if limit is None else max(1, min(limit, self.data_limit))
        writer = self._writer
        if writer is None and not self._channel.idle:
            await self._write_one_by_one(chunks, cap, tag)
            return
        if writer is None:
            if self._reader is not None:
                raise RuntimeError(f"{self._where()}: requests are outstanding")
            window = self.window or default_window(cap)
            writer = self._writer = WritePipeline(
                self._sock, self._where(), timeout=self.timeout, window=window
            )
        # One chunk per idx (no empty packet skipped): each write names its own idx.
        writes: Iterator[tuple[list[memoryview], int, Tag]]
        if tag is not None and tag[1] - tag[0] == len(chunks):
            base = tag[0]
            writes = (
                (pieces, size, (base + first, base + last + 1))
                for pieces, size, first, last in _split(chunks, cap)
            )
        else:
            writes = ((pieces, size, tag) for pieces, size, _, _ in _split(chunks, cap))
        await writer.write(writes)

    async def _write_one_by_one(
        self, chunks: Sequence[Buffer], cap: int, tag: tuple[int, int] | None
    ) -> None:
        """MIG_DATA_WRITE through the shared receiver, each waiting for its reply (while
        `serve_requests` runs or other requests are outstanding)."""
        for pieces, size, first, last in _split(chunks, cap):
            head = MIG_SIZES.pack(MIG_DATA_HEADER_SIZE + size, size)
            try:
                await self.request(Command.MIG_DATA_WRITE, [head, *pieces])
            except VfioUserCommandError as exc:
                idx = None if tag is None else tag[0] + first
                raise WriteFailed(
                    f"{exc} (idx {idx}..{None if tag is None else tag[0] + last})"
                    if tag is not None
                    else exc.message,
                    command=exc.command,
                    errno=exc.errno,
                    idx=idx,
                ) from None

    async def read_stream(self, max_bytes: int) -> list[memoryview]:
        """The next pieces of the STOP_COPY stream (at most ``max_bytes`` in all), read
        with `window` MIG_DATA_READs of `data_limit` bytes in flight; ``[]`` at the end
        (the device returned 0 bytes)."""
        reader = self._reader
        if reader is None and not self._channel.idle:
            data = await self.read_data(max_bytes)
            return [memoryview(data)] if data else []
        if reader is None:
            if self._writer is not None and self._writer.pending:
                raise RuntimeError(f"{self._where()}: requests are outstanding")
            window = self.window or default_window(self.data_limit)
            reader = self._reader = ReadPipeline(
                self._sock, self._where(), timeout=self.timeout, window=window,
                size=self.data_limit,
            )  # fmt: skip
        return await reader.read(max_bytes)

    def native_read(self) -> tuple[object, ...] | None:
        """The STOP_COPY stream for the C send path's reader (see `_native_read`):
        ``("vfio-user", fd, size, window, timeout_ms)`` (`vfiomig._native.SendJob`), or
        None when the socket cannot be handed over now: the client is broken, has
        requests outstanding or bytes buffered, or a MIG_DATA pipeline of its own."""
        if (
            self.broken
            or not self._channel.idle
            or self._reader is not None
            or (self._writer is not None and self._writer.pending)
        ):
            return None
        window = self.window or default_window(self.data_limit)
        timeout_ms = max(1, min(math.ceil(self.timeout * 1000), 2**31 - 1))
        return ("vfio-user", self._sock.fileno(), self.data_limit, window, timeout_ms)

    def native_read_ended(self, detail: tuple[object, ...]) -> BaseException | None:
        """The C reader handed the socket back (``detail``: `SendJob.source_detail`, see
        `_native_read`): the error its failure is, worded as `read_stream`'s would be
        (None: it did not fail); the client is broken unless the reader left it in step."""
        error = native_read_error(self._where(), self.data_limit, self.timeout, detail)
        if not detail[6]:
            self._channel.fail(
                error
                if error is not None
                else SinkError(f"{self._where()}: replies left owed", errno=_errno.EPIPE)
            )
        return error

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

    async def region_write(self, index: int, offset: int, data: Buffer, *, what: str = "") -> None:
        """REGION_WRITE, split into transfers of at most `data_limit` bytes; ``what``
        names the step in an error (default: the region and offset)."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.data_limit):
            piece = bytes(view[start : start + self.data_limit])
            req = RegionWrite(index, offset + start, piece)
            step = what or f"region {index} at {offset + start:#x}"
            await self.request(Command.REGION_WRITE, req.pack(), step)

    async def reset(self) -> None:
        """DEVICE_RESET."""
        body = await self.request(Command.DEVICE_RESET, Empty().pack())
        assert isinstance(body, Empty)

    async def aclose(self) -> None:
        """Close the socket, the guest memory and the interrupts' eventfds; idempotent.
        Replies still in flight are dropped."""
        self._channel.close()
        self._close_device_resources()
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> VfioUserClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _split(
    chunks: Sequence[Buffer], limit: int
) -> Iterator[tuple[list[memoryview], int, int, int]]:
    """Regroup ``chunks`` into runs of at most ``limit`` bytes, without copying: yields
    (pieces, size, index of the chunk of its first byte, index of that of its last)."""
    run: list[memoryview] = []
    size = first = last = 0
    for i, chunk in enumerate(chunks):
        view = memoryview(chunk).cast("B")
        while view:
            if not size:
                first = i
            last = i
            take = min(limit - size, len(view))
            run.append(view[:take])
            size += take
            view = view[take:]
            if size == limit:
                yield run, size, first, last
                run, size = [], 0
    if size:
        yield run, size, first, last


async def open_vfio_user_client(
    path: str | os.PathLike[str],
    *,
    reply_timeout: float = DEFAULT_TIMEOUT,
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
    window: int | None = None,
    max_msg_fds: int = 1,
) -> VfioUserClient:
    """Connect to the vfio-user server at ``path`` and negotiate VERSION.

    ``reply_timeout`` bounds every single wait of the client's life: the connect, each send
    and each reply. ``max_data_xfer_size`` is what we advertise (libvfio-user bounds
    MIG_DATA_* by it) and the most we send in one message. ``max_msg_fds``: the most fds we
    take in one reply (advertised; GET_REGION_IO_FDS needs one per distinct ioeventfd).

    Cancellation: safe; a half-open connection is closed.
    """
    path = os.fspath(path)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.setblocking(False)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    sock = trio.socket.from_stdlib_socket(raw)
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
        raw,
        path,
        timeout=reply_timeout,
        max_data_xfer_size=max_data_xfer_size,
        window=window,
        max_msg_fds=max_msg_fds,
    )
    try:
        await client.negotiate()
    except SinkError as exc:
        with trio.CancelScope(shield=True):
            await client.aclose()
        if exc.errno == _errno.EBUSY:
            # vfiomig's server answers a second client's VERSION with EBUSY.
            raise SinkError(
                f"vfio-user {path}: the server is serving another client (a VMM?): it"
                " answered VERSION with EBUSY; a vfio-user server serves one client at a time",
                errno=exc.errno,
            ) from exc
        if exc.errno in (_errno.EPIPE, _errno.ECONNRESET):
            # libvfio-user and vfiomig's server serve one client at a time and close
            # any other at once: the usual reason for a hang-up before VERSION.
            raise SinkError(
                f"{exc.message}: the server hung up before answering VERSION (a vfio-user "
                "server serves one client at a time: is another one, a VMM, attached?)",
                errno=exc.errno,
            ) from exc
        raise
    except BaseException:
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise
    return client
