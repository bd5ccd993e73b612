"""vfio-user sources read by the C send path's reader thread (native/vfiomig_sendvu.c) from
servers that misbehave: each failure gives the one line the trio sender's (the Python
client's) gives for the same server, the channels reset, the device in the same state (back
to RUNNING after an ERROR reply or a cancel: the replies owed collected by the thread), no
thread left behind. A proxy in front of vfiomig's own server rewrites the server's side."""

from __future__ import annotations

import os
import random
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import vfiomig.send._threads as threads_module
from tests.integration.send_helpers import Stream, run_send, send_threads
from tests.vfio_user_raw import serving, take_messages
from vfiomig import _core as core
from vfiomig.send import SendError
from vfiomig.vfio_user import MigState, VfioUserSource
from vfiomig.vfio_user._header import HEADER, Command

pytestmark = pytest.mark.skipif(
    getattr(core, "SendJob", None) is None, reason="the C send path needs the C core"
)

DATA = random.Random(5).randbytes((3 << 20) + 4321)
LIMIT = 1 << 16  # the server's max_data_xfer_size: 64 KiB replies, a window of 128
REPLY = 0x1
READ = int(Command.MIG_DATA_READ)
#: What a mangle returns to close the client's connection.
CLOSE = b"close"

#: mangle(message, reads): the bytes to pass on instead of the server's ``message``
#: (``reads``: MIG_DATA_READ replies passed on so far), None to stop passing anything on
#: (a server that hangs), CLOSE to close the client's connection.
Mangle = Callable[[bytes, int], "bytes | None"]


class Resumes(Stream):
    """A stream that ends (a 0-byte reply) and then has more: not a STOP_COPY stream."""

    def read_data(self, size: int) -> bytes:
        chunk = super().read_data(size)
        if not chunk and self.at == len(self.data):
            self.at += 1  # the end, once
        elif not chunk:
            return b"xyz"
        return chunk


def _is_read_reply(message: bytes) -> bool:
    _, command, _, flags, _ = HEADER.unpack_from(message)
    return bool(command == READ and flags & 0xF == REPLY)


async def _proxy(
    client: trio.socket.SocketType,
    server_path: str,
    mangle: Mangle,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    down = trio.SocketStream(client)
    up = await trio.open_unix_socket(server_path)

    async def upstream() -> None:
        try:
            while data := await down.receive_some(1 << 16):
                await up.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def downstream() -> None:
        pending = b""
        reads = 0
        while data := await up.receive_some(1 << 20):
            messages, pending = take_messages(pending + data)
            for message in messages:
                out = mangle(message, reads)
                reads += _is_read_reply(message)
                if out is None:
                    await trio.sleep_forever()
                if out is CLOSE:
                    await down.aclose()
                    return
                await down.send_all(out)

    async with down, up, trio.open_nursery() as nursery:
        task_status.started()
        nursery.start_soon(upstream)
        await downstream()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def proxied(server_path: str, mangle: Mangle) -> AsyncIterator[str]:
    path = server_path + ".p"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            conn, _ = await listener.accept()
            await nursery.start(_proxy, conn, server_path, mangle)

        nursery.start_soon(accept)
        try:
            yield path
        finally:
            nursery.cancel_scope.cancel()
            listener.close()
            os.unlink(path)


def stray(message: bytes, reads: int) -> bytes:
    """The fourth read reply answers a msg_id nobody asked."""
    if reads == 3 and _is_read_reply(message):
        msg_id = struct.unpack_from("=H", message)[0] ^ 0x4000
        return struct.pack("=H", msg_id) + message[2:]
    return message


def request(message: bytes, reads: int) -> bytes:
    """A DMA_READ request of the server's before the fourth read reply."""
    if reads == 3 and _is_read_reply(message):
        head = HEADER.pack(77, int(Command.DMA_READ), 32, 0, 0)
        return head + struct.pack("=QQ", 0x1000, 8) + message
    return message


def too_much(message: bytes, reads: int) -> bytes:
    """The fourth read reply says one byte more than it carries."""
    if reads == 3 and _is_read_reply(message):
        carried = len(message) - 24
        return message[:20] + struct.pack("=I", carried + 1) + message[24:]
    return message


def short(message: bytes, reads: int) -> bytes:
    """The fourth read reply's payload is 4 bytes: not even its sizes."""
    if reads == 3 and _is_read_reply(message):
        return struct.pack("=HHI", *struct.unpack_from("=HH", message), 20) + message[8:20]
    return message


def swapped() -> Mangle:
    """The fourth and fifth read replies come in each other's place."""
    held: list[bytes] = []

    def mangle(message: bytes, reads: int) -> bytes:
        if reads == 3 and _is_read_reply(message):
            held.append(message)
            return b""
        if reads == 4 and held:
            return message + held.pop()
        return message

    return mangle


def close(message: bytes, reads: int) -> bytes | None:
    return CLOSE if reads == 3 and _is_read_reply(message) else message


def hang(message: bytes, reads: int) -> bytes | None:
    return None if reads == 3 and _is_read_reply(message) else message


def keep(message: bytes, reads: int) -> bytes:
    return message


#: name -> (the device's stream, the proxy's mangle, the client's reply timeout)
CASES: dict[str, tuple[Callable[[], Stream], Mangle, float]] = {
    "error-reply": (lambda: Stream(DATA, LIMIT, fail_at=1 << 20), keep, 5),
    "after-end": (lambda: Resumes(DATA[:300_000], LIMIT), keep, 5),
    "stray-msg-id": (lambda: Stream(DATA, LIMIT), stray, 5),
    "server-request": (lambda: Stream(DATA, LIMIT), request, 5),
    "too-much": (lambda: Stream(DATA, LIMIT), too_much, 5),
    "short-payload": (lambda: Stream(DATA, LIMIT), short, 5),
    "server-closes": (lambda: Stream(DATA, LIMIT), close, 5),
    "server-hangs": (lambda: Stream(DATA, LIMIT), hang, 1),
}


async def failed_send(
    name: str, threads: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, list[MigState], dict[int, str], list[str], bool]:
    """Send case ``name`` with ``VFIOMIG_SEND_THREADS=threads``: the error's text (the
    socket path as SOCK), the device's states, how the channels ended, the C path's modes."""
    make, mangle, timeout = CASES[name]
    stream = make()
    modes: list[str] = []
    real = threads_module.send_threaded

    async def spy(devices: Any, chosen: list[str], *args: Any, **kwargs: Any) -> None:
        modes.extend(chosen)
        await real(devices, chosen, *args, **kwargs)

    monkeypatch.setenv("VFIOMIG_SEND_THREADS", threads)
    monkeypatch.setattr("vfiomig.send._sender.send_threaded", spy)
    endings: dict[int, str] = {}
    async with serving(stream.device) as server_path, proxied(server_path, mangle) as path:
        source = VfioUserSource(path, reply_timeout=timeout, max_data_xfer_size=LIMIT)
        with pytest.raises(SendError) as info:
            await run_send(source, 3, endings=endings, packet_size=65536)
        await source.aclose()
    assert send_threads() == []
    text = str(info.value).replace(path, "SOCK")
    return text, stream.states, endings, modes, source.read_natively


@pytest.mark.parametrize("name", CASES)
async def test_a_failing_server_gives_the_python_clients_error(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(60):
        text, states, endings, modes, native = await failed_send(name, "1", monkeypatch)
        trio_text, trio_states, trio_endings, none, _ = await failed_send(name, "0", monkeypatch)
    assert modes == ["stream"] and none == []  # the C path, then the trio sender
    assert native  # the C reader thread read it
    if name == "server-closes":  # which call sees the reset first is a race, either path
        lost = re.compile(
            r": vfio-user SOCK: (server closed the connection with \d+ replies outstanding"
            r"|receiving a reply failed \(\[Errno 104\] Connection reset by peer\)"
            r"|sending MIG_DATA_READ failed \(\[Errno 32\] Broken pipe\))$"
        )
        assert lost.search(text) and lost.search(trio_text), (text, trio_text)
    else:  # the same words; only a msg_id differs (the C reader's count from 0x8000)
        assert re.sub(r"msg_id \d+,", "msg_id N,", text) == re.sub(
            r"msg_id \d+,", "msg_id N,", trio_text
        )
    assert text.startswith("0000:00:04.0/vfio/0: reading source vfio-user:SOCK failed: ")
    assert "\n" not in text
    assert states == trio_states
    assert endings == trio_endings == {0: "reset", 1: "reset", 2: "reset"}, endings
    expected = {
        "error-reply": "MIG_DATA_READ (65536 bytes at stream offset 1048576) failed with errno 5",
        "after-end": "mig data read returned 3 bytes after the end",
        "stray-msg-id": "MIG_DATA_READ reply to msg_id",
        "server-request": "server sent DMA_READ msg_id 77 with flags 0x0 while MIG_DATA_READ",
        "too-much": "mig data read returned 65537 bytes (asked 65536, carried 65536)",
        "short-payload": "MIG_DATA_READ reply payload of 4 bytes is too short (min 8)",
        "server-closes": "vfio-user SOCK: ",
        "server-hangs": "waiting for a reply took longer than 1 s",
    }[name]
    assert expected in text, text
    # After an ERROR reply the client stayed in step: the device is back in RUNNING; after
    # a broken protocol it is left as it was (the Python client does the same).
    if name == "error-reply":
        assert states[-1] == MigState.RUNNING, states
    else:
        assert states[-1] == MigState.STOP_COPY, states


async def test_replies_out_of_request_order_break_the_protocol() -> None:
    """The Python pipeline keeps a reply that comes before its turn aside; the C reader
    receives each reply's data into its place in the stream and takes replies in request
    order only (servers process requests in the order received): a protocol error."""
    stream = Stream(DATA, LIMIT)
    with trio.fail_after(60):
        async with serving(stream.device) as server_path, proxied(server_path, swapped()) as path:
            source = VfioUserSource(path, reply_timeout=5, max_data_xfer_size=LIMIT)
            with pytest.raises(SendError) as info:
                await run_send(source, 3, packet_size=65536)
            await source.aclose()
    text = str(info.value).replace(path, "SOCK")
    assert source.read_natively
    assert re.fullmatch(
        r"0000:00:04\.0/vfio/0: reading source vfio-user:SOCK failed: vfio-user SOCK: server"
        r" answered MIG_DATA_READ msg_id (\d+) before msg_id (\d+) \(replies out of request"
        r" order\)",
        text,
    ), text
    assert stream.states[-1] == MigState.STOP_COPY  # broken: left as it was
    assert send_threads() == []


async def test_a_cancel_with_replies_owed_leaves_the_device_running() -> None:
    """The receiver reads nothing: the reader waits for room with a window of requests in
    flight; a cancel collects their replies, and the abort's SET RUNNING is answered."""
    stream = Stream(bytes(64 << 20), 1 << 20)
    modes: list[str] = []
    real = threads_module.send_threaded

    async def spy(devices: Any, chosen: list[str], *args: Any, **kwargs: Any) -> None:
        modes.extend(chosen)
        await real(devices, chosen, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, trio.fail_after(60):
        mp.setattr("vfiomig.send._sender.send_threaded", spy)
        async with serving(stream.device) as path:
            source = VfioUserSource(path, reply_timeout=5, max_data_xfer_size=1 << 20)
            with trio.move_on_after(1) as scope:
                await run_send(source, 2, read=False, packet_size=65536)
            assert scope.cancelled_caught
            await source.aclose()
    assert modes == ["stream"] and source.read_natively
    assert 0 < stream.at < len(stream.data)  # stopped mid-stream
    assert stream.states[-1] == MigState.RUNNING, stream.states
    assert send_threads() == []
