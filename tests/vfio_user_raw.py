"""A raw vfio-user client for tests: any bytes, any fds (SCM_RIGHTS), both directions."""

from __future__ import annotations

import array
import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from vfiomig.vfio_user import VfioUserDevice, serve_vfio_user
from vfiomig.vfio_user._header import HEADER, Command
from vfiomig.vfio_user._version import Capabilities, Version
from vfiomig.vfio_user.server._eventfds import SIGNALLERS

FLAG_REPLY = 0x1
FLAG_ERROR = 0x20


@dataclass
class Received:
    msg_id: int
    command: int
    flags: int
    errno: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)


class RawClient:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []
        self.next_id = 1

    @classmethod
    async def connect(
        cls, path: str, *, version: bool = True, caps: Capabilities | None = None
    ) -> RawClient:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        raw = cls(sock)
        if version:
            got = await raw.call(Command.VERSION, Version(0, 2, caps or Capabilities()).pack())
            assert not got.is_error, got
        return raw

    async def send(
        self,
        command: int,
        payload: bytes,
        fds: list[int] | tuple[int, ...] = (),
        *,
        msg_id: int | None = None,
        flags: int = 0,
        size: int | None = None,
    ) -> int:
        if msg_id is None:
            msg_id, self.next_id = self.next_id, (self.next_id + 1) & 0xFFFF
        head = HEADER.pack(msg_id, command, 16 + len(payload) if size is None else size, flags, 0)
        await self.send_raw(head + payload, fds)
        return msg_id

    async def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Any bytes, all of them; ``fds`` go with the first."""
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        sent = await self.sock.sendmsg([data], anc)
        while sent < len(data):
            sent += await self.sock.send(data[sent:])

    async def receive(self) -> Received:
        """The next whole message; EOFError if the server closed."""
        while True:
            if len(self.buf) >= 16:
                msg_id, command, size, flags, error_no = HEADER.unpack_from(self.buf)
                if len(self.buf) >= size:
                    payload = bytes(self.buf[16:size])
                    del self.buf[:size]
                    fds, self.fds = self.fds, []
                    return Received(msg_id, command, flags, error_no, payload, fds)
            data, anc, _, _ = await self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.fds += list(struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) // 4 * 4]))
            if not data:
                raise EOFError
            self.buf += data

    async def call(
        self, command: int, payload: bytes, fds: list[int] | tuple[int, ...] = ()
    ) -> Received:
        msg_id = await self.send(command, payload, fds)
        got = await self.receive()
        assert got.msg_id == msg_id and got.command == command, got
        return got

    async def errno_of(
        self, command: int, payload: bytes, fds: list[int] | tuple[int, ...] = ()
    ) -> int:
        got = await self.call(command, payload, fds)
        for fd in got.fds:
            os.close(fd)
        return got.errno if got.is_error else 0

    async def reply(self, request: Received, payload: bytes, *, error: int = 0) -> None:
        flags = FLAG_REPLY | (FLAG_ERROR if error else 0)
        head = HEADER.pack(request.msg_id, request.command, 16 + len(payload), flags, error)
        await self.sock.send(head + payload)

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def open_fds(settled: bool = True) -> int:
    """How many fds this process has open; ``settled``: once no interrupt write to a blocking
    eventfd is in flight (each holds a dup of its eventfd for a moment)."""
    if settled:
        SIGNALLERS.wait_idle(5)
    return len(os.listdir("/proc/self/fd"))


@asynccontextmanager
async def serving(device: VfioUserDevice) -> AsyncIterator[str]:
    """``device`` served on a fresh short socket path (AF_UNIX paths are limited to 108
    bytes) until the block ends; the server removes its socket file when it stops."""
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
        path = os.path.join(tmp, "s")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_vfio_user, path, device)
            yield path
            nursery.cancel_scope.cancel()
        assert not await trio.Path(path).exists()


def take_messages(pending: bytes) -> tuple[list[bytes], bytes]:
    """The whole vfio-user messages at the start of ``pending`` (each as long as its
    header's size says), and what is left of it (a message in part)."""
    messages = []
    while len(pending) >= 16:
        size = int.from_bytes(pending[4:8], "little")
        if len(pending) < size:
            break
        messages.append(pending[:size])
        pending = pending[size:]
    return messages, pending
