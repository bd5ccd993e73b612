"""What the C send path's tests share (test_send_threads.py, test_send_devices.py,
test_send_vfio_user_native.py): a loopback receiver that drains, hashes, stalls or resets
the channels, a `send_migration` of one device into it, the send threads alive in this
process, a vfio-user device on vfiomig's own server whose stream is given bytes, and the
channels' hashes of a send with or without the C send path."""

from __future__ import annotations

import errno
import hashlib
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.vfio_user_raw import serving
from vfiomig._core._wire import HANDSHAKE_SIZE
from vfiomig.send import SendDevice, SendError, send_migration
from vfiomig.vfio_user import MigState as UserState
from vfiomig.vfio_user import VfioUserDevice, VfioUserSource

UUID = bytes(range(16))
IDSTR = "0000:00:04.0/vfio"


def send_threads() -> list[str]:
    """The C send path's threads alive in this process."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # gone meanwhile
        if name.startswith(("vfm-send-", "vfm-read-")):
            names.append(name)
    return names


async def serve(
    listener: trio.SocketListener,
    n: int,
    nursery: trio.Nursery,
    *,
    reset_after: int | None = None,
    read: bool = True,
    hashes: dict[int, Any] | None = None,
    endings: dict[int, str] | None = None,
    after: tuple[int, Callable[[], None]] | None = None,
) -> None:
    """Accept ``n`` channels; drain each (or not; into ``hashes``, by channel), or reset
    channel 1 after ``reset_after`` bytes of data; how each drained channel ended (``fin``
    or ``reset``) goes into ``endings``, by channel; ``after`` (bytes, fn): fn() called
    once channel 0 got that many."""
    endings = {} if endings is None else endings

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            hello = b""
            while len(hello) < HANDSHAKE_SIZE:
                hello += await stream.receive_some(HANDSHAKE_SIZE - len(hello))
            if not read:
                await trio.sleep_forever()
            got = 0
            h = hashlib.sha256()
            if hashes is not None:
                hashes[hello[24]] = h
            try:
                while chunk := await stream.receive_some(1 << 16):
                    got += len(chunk)
                    h.update(chunk)
                    if after is not None and hello[24] == 0 and got >= after[0] > got - len(chunk):
                        after[1]()
                    if reset_after is not None and hello[24] == 1 and got >= reset_after:
                        linger = struct.pack("ii", 1, 0)
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                        endings[hello[24]] = "reset by us"
                        return  # closed with SO_LINGER 0: a reset
            except trio.BrokenResourceError:
                endings[hello[24]] = "reset"  # a failed sender resets its channels
            else:
                endings[hello[24]] = "fin"

    for _ in range(n):
        nursery.start_soon(one, await listener.accept())


async def run_send(
    source: object,
    channels: int = 2,
    *,
    reset_after: int | None = None,
    read: bool = True,
    hashes: dict[int, Any] | None = None,
    endings: dict[int, str] | None = None,
    packet_size: int = 65536,
    after: tuple[int, Callable[[], None]] | None = None,
) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    failure: SendError | None = None
    with listener.socket:  # closed however this ends
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve(
                    listener,
                    channels,
                    nursery,
                    reset_after=reset_after,
                    read=read,
                    hashes=hashes,
                    endings=endings,
                    after=after,
                )
            )
            try:
                await send_migration(
                    connect_to=[f"tcp:127.0.0.1:{port}"],
                    channels=channels,
                    uuid=UUID,
                    devices=[SendDevice(IDSTR, 0, source)],  # type: ignore[arg-type]
                    packet_size=packet_size,
                    close_timeout=5,
                )
            except SendError as exc:
                failure = exc
                if endings is not None:  # how the other channels end, seen by their readers
                    with trio.move_on_after(5):
                        while len(endings) < channels:  # noqa: ASYNC110 - no event per channel
                            await trio.sleep(0.01)
            finally:
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


class Stream:
    """A vfio-user device whose STOP_COPY stream is ``data`` (replies of ``limit`` bytes);
    with ``fail_at``, a MIG_DATA_READ that would reach that offset gets an ERROR reply."""

    def __init__(self, data: bytes, limit: int, fail_at: int | None = None) -> None:
        self.data = data
        self.at = 0
        self.fail_at = fail_at
        self.states: list[UserState] = []
        self.device = VfioUserDevice(migration=self, max_data_xfer_size=limit)

    def transition(self, state: UserState) -> None:
        self.states.append(state)

    def read_data(self, size: int) -> bytes:
        if self.fail_at is not None and self.at + size > self.fail_at:
            raise OSError(errno.EIO, "the device failed")
        chunk = self.data[self.at : self.at + size]
        self.at += len(chunk)
        return chunk

    def write_data(self, data: memoryview) -> int:
        return 0


class UserDevice:
    """A `VfioUserSource` on vfiomig's own server, its device a `Stream`."""

    def __init__(self, stream: Stream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self._serving: Any = None

    async def __aenter__(self) -> VfioUserSource:
        self._serving = serving(self.stream.device)
        path = await self._serving.__aenter__()
        return VfioUserSource(path, reply_timeout=5, max_data_xfer_size=self.limit)

    async def __aexit__(self, *exc: object) -> None:
        await self._serving.__aexit__(*exc)


async def hashes_of(
    make: Callable[[], Any], channels: int, packet: int, threads: str
) -> tuple[list[str], list[str]]:
    """Send the source ``make()`` gives with ``VFIOMIG_SEND_THREADS=threads``: the sha256
    of every channel, and the C send path's modes it chose (none: the trio sender)."""
    import vfiomig.send._threads as threads_module

    modes: list[str] = []
    real = threads_module.send_threaded

    async def spy(devices: Any, chosen: list[str], *args: Any, **kwargs: Any) -> None:
        modes.extend(chosen)
        await real(devices, chosen, *args, **kwargs)

    hashes: dict[int, Any] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFIOMIG_SEND_THREADS", threads)
        mp.setattr("vfiomig.send._sender.send_threaded", spy)
        async with make() as source:
            await run_send(source, channels, hashes=hashes, packet_size=packet)
    assert send_threads() == []
    return [hashes[i].hexdigest() for i in range(channels)], modes
