"""What the C send path's tests share (test_send_threads.py, test_send_devices.py): a
loopback receiver that drains, hashes, stalls or resets the channels, a `send_migration`
of one device into it, and the send threads alive in this process."""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from vfiomig._core._wire import HANDSHAKE_SIZE
from vfiomig.send import SendDevice, SendError, send_migration

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
