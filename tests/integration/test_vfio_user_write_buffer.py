"""MIG_DATA_WRITE bodies received straight into an emulator's buffer (`WriteBuffer`):
what lands where, requests pipelined around it, hostile lengths, refusals, a body cut
short by the client or by cancellation. Real UNIX sockets, vfiomig's sink or raw bytes."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import tempfile

import pytest
import trio

from tests.vfio_user_raw import RawClient, serving
from vfiomig.vfio_user import (
    Capabilities,
    Command,
    MigState,
    ResetReason,
    VfioUserDevice,
    VfioUserSink,
    serve_vfio_user,
)
from vfiomig.vfio_user._migration_bodies import FEATURE_GET, FEATURE_MIG_DEVICE_STATE, FEATURE_SET

LIMIT = 1 << 20
MIG = struct.Struct("=II")
STATE = struct.Struct("=IIII")  # argsz, flags, device_state, data_fd


class Store:
    """A device whose state is one preallocated buffer, loaded through `WriteBuffer`."""

    def __init__(self, capacity: int = 8 << 20) -> None:
        self.view = memoryview(bytearray(capacity))
        self.committed = 0
        self.asked: list[int] = []
        self.copied: list[int] = []  # sizes that came through write_data
        self.resets: list[ResetReason] = []
        self.commit_errno = 0
        self.short = False  # write_buffer gives one byte too few
        self.direct = True  # False: write_buffer declines (None)
        self.buffer_asked = trio.Event()
        self.was_reset = trio.Event()
        self.device = VfioUserDevice(
            migration=self, reset=self.reset, max_data_xfer_size=LIMIT, migration_flags=1
        )

    def transition(self, state: MigState) -> None:
        pass

    def read_data(self, size: int) -> bytes:
        return b""

    def write_data(self, data: memoryview) -> int:
        self.copied.append(len(data))
        self.view[self.committed : self.committed + len(data)] = data
        self.committed += len(data)
        return len(data)

    def write_buffer(self, size: int) -> memoryview | None:
        self.asked.append(size)
        self.buffer_asked.set()
        if self.committed + size > len(self.view):
            raise OSError(errno.ENOSPC, f"state of {self.committed + size} bytes")
        if not self.direct:
            return None
        return self.view[self.committed : self.committed + size - self.short]

    def write_commit(self, size: int) -> None:
        if self.commit_errno:
            raise OSError(self.commit_errno, "commit refused")
        self.committed += size

    def reset(self, reason: ResetReason) -> None:
        self.resets.append(reason)
        self.was_reset.set()
        self.committed = 0

    @property
    def state(self) -> bytes:
        return bytes(self.view[: self.committed])


def write(data: bytes, *, size: int | None = None, argsz: int | None = None) -> bytes:
    """A MIG_DATA_WRITE payload (argsz, size, data), lengths overridable."""
    n = len(data) if size is None else size
    return MIG.pack(8 + n if argsz is None else argsz, n) + data


def get_state() -> bytes:
    return STATE.pack(16, FEATURE_GET | FEATURE_MIG_DEVICE_STATE, 0, 0)[:8]


async def resuming(path: str, **kwargs: object) -> RawClient:
    raw = await RawClient.connect(path, **kwargs)  # type: ignore[arg-type]
    setter = STATE.pack(16, FEATURE_SET | FEATURE_MIG_DEVICE_STATE, MigState.RESUMING, 0)
    assert await raw.errno_of(Command.DEVICE_FEATURE, setter) == 0
    return raw


async def test_sink_writes_land_in_the_emulator_buffer() -> None:
    store = Store()
    data = random.Random(1).randbytes(3 * LIMIT + 12345)
    with trio.fail_after(10):
        async with serving(store.device) as path:
            sink = VfioUserSink(path, max_write=LIMIT, reply_timeout=5)
            await sink.start()
            view = memoryview(data)
            await sink.write([view[i : i + 700_000] for i in range(0, len(data), 700_000)])
            await sink.finish()
            await sink.aclose()
    assert store.state == data
    assert store.copied == []  # every body went through the buffer
    assert sum(store.asked) == len(data) and max(store.asked) == LIMIT
    assert store.device.state == MigState.STOP and store.resets == []


async def test_declined_writes_go_to_write_data() -> None:
    store = Store()
    store.direct = False
    data = random.Random(2).randbytes(100_000)
    with trio.fail_after(10):
        async with serving(store.device) as path:
            raw = await resuming(path)
            assert await raw.errno_of(Command.MIG_DATA_WRITE, write(data)) == 0
            raw.close()
    assert store.state == data and store.copied == [len(data)]


async def test_pipelined_requests_around_large_writes_keep_their_order() -> None:
    store = Store()
    rng = random.Random(3)
    a, b, d = rng.randbytes(300_000), rng.randbytes(5), rng.randbytes(LIMIT)
    with trio.fail_after(10):
        async with serving(store.device) as path:
            raw = await resuming(path)
            requests = [
                (Command.MIG_DATA_WRITE, write(a)),
                (Command.DEVICE_FEATURE, get_state()),
                (Command.MIG_DATA_WRITE, write(b)),
                (Command.MIG_DATA_WRITE, write(b"x" * 1000, size=2000)),  # carries too little
                (Command.MIG_DATA_WRITE, write(d)),
                (Command.DEVICE_FEATURE, get_state()),
            ]
            stream = bytearray()
            for i, (command, payload) in enumerate(requests):
                stream += struct.pack("=HHIII", 10 + i, command, 16 + len(payload), 0, 0)
                stream += payload
            at = 0
            while at < len(stream):  # pieces that cut headers and bodies anywhere
                n = rng.choice((1, 7, 23, 4096, 70_000, 400_000))
                await raw.send_raw(bytes(stream[at : at + n]))
                at += n
                await trio.lowlevel.checkpoint()
            replies = [await raw.receive() for _ in requests]
            raw.close()
    assert [r.msg_id for r in replies] == list(range(10, 16))
    assert [r.errno for r in replies] == [0, 0, 0, errno.EINVAL, 0, 0]
    assert STATE.unpack(replies[1].payload)[2] == MigState.RESUMING
    assert store.state == a + b + d
    assert store.asked == [len(a), len(b), len(d)] and store.copied == []


@pytest.mark.parametrize(
    ("payload", "size", "expected"),
    [
        (write(b"y" * 4096, argsz=8), None, errno.EINVAL),  # argsz below the data
        (write(b"y" * 4096, size=4097), None, errno.EINVAL),  # carries less than it says
        (write(b"y" * 8192), None, errno.EINVAL),  # over the client's advertised limit
        (write(b"y" * 16), 1 << 30, errno.EINVAL),  # a message size over the server's limit
        (write(b""), None, 0),  # empty: the handler's path, nothing asked
    ],
    ids=["argsz", "size-mismatch", "client-limit", "message-size", "empty"],
)
async def test_hostile_lengths_commit_nothing(
    payload: bytes, size: int | None, expected: int
) -> None:
    store = Store()
    good = b"z" * 5000
    with trio.fail_after(10):
        async with serving(store.device) as path:
            raw = await resuming(path, caps=Capabilities(max_data_xfer_size=4096 + 1024))
            await raw.send(Command.MIG_DATA_WRITE, payload, size=size)
            if size is not None:  # the rest the header claims never comes: only the reply
                got = await raw.receive()
                assert got.errno == expected
                raw.close()
                raw = await resuming(path)
            else:
                got = await raw.receive()
                assert (got.errno if got.is_error else 0) == expected
            assert await raw.errno_of(Command.MIG_DATA_WRITE, write(good)) == 0
            raw.close()
    assert store.state == good and store.resets == []
    assert store.asked == [len(good)]


@pytest.mark.parametrize("fault", ["buffer-full", "short-view", "commit"])
async def test_emulator_refusals_reach_the_client_and_the_stream_goes_on(fault: str) -> None:
    store = Store(capacity=300_000 if fault == "buffer-full" else 1 << 20)
    first = b"a" * 200_000
    body = b"b" * 200_000  # over the capacity once ``first`` is in
    if fault == "short-view":
        store.short = True
        first = b""
    elif fault == "commit":
        store.commit_errno = errno.EIO
    expected = {"buffer-full": errno.ENOSPC, "short-view": errno.EINVAL, "commit": errno.EIO}
    with trio.fail_after(10):
        async with serving(store.device) as path:
            raw = await resuming(path)
            if first:
                store.commit_errno, saved = 0, store.commit_errno
                assert await raw.errno_of(Command.MIG_DATA_WRITE, write(first)) == 0
                store.commit_errno = saved
            assert await raw.errno_of(Command.MIG_DATA_WRITE, write(body)) == expected[fault]
            # The connection is in step: the next request is framed and answered.
            got = await raw.call(Command.DEVICE_FEATURE, get_state())
            assert STATE.unpack(got.payload)[2] == MigState.RESUMING
            raw.close()
    assert store.state == first and store.resets == []


def message(msg_id: int, command: int, payload: bytes, *, size: int | None = None) -> bytes:
    return (
        struct.pack("=HHIII", msg_id, command, 16 + len(payload) if size is None else size, 0, 0)
        + payload
    )


@pytest.mark.parametrize("dropped", ["refused-write", "oversized"])
async def test_requests_buffered_behind_dropped_bytes_are_answered(dropped: str) -> None:
    # Found by the vfio_user_connection fuzz target: once the bytes of a refused request
    # were dropped, the server waited for more bytes before looking at the requests
    # already in its buffer; a client waiting for their replies waited for ever.
    store = Store(capacity=1000)
    first = message(3, Command.MIG_DATA_WRITE, write(b"r" * 600_000))  # ENOSPC: no room
    if dropped == "oversized":  # over the server's message limit, sent whole anyway
        first = message(3, Command.MIG_DATA_WRITE, b"o" * (LIMIT + 100))
    with trio.fail_after(10):
        async with serving(store.device) as path:
            raw = await resuming(path)
            await raw.send_raw(first + message(4, Command.DEVICE_FEATURE, get_state()))
            refused, answered = await raw.receive(), await raw.receive()
            raw.close()
    assert refused.msg_id == 3 and refused.errno in (errno.ENOSPC, errno.EINVAL)
    assert answered.msg_id == 4 and STATE.unpack(answered.payload)[2] == MigState.RESUMING


@pytest.mark.parametrize("broken", ["header-below-16", "body-cut-short"])
async def test_replies_queued_before_the_framing_breaks_are_sent(broken: str) -> None:
    # Found by the vfio_user_connection fuzz target: the batched success replies of the
    # requests handled before a framing error were dropped with the connection.
    store = Store()
    good = b"g" * 1000
    tail = message(6, Command.MIG_DATA_WRITE, b"", size=8)
    if broken == "body-cut-short":
        tail = message(6, Command.MIG_DATA_WRITE, write(b"h" * 5000))[:3000]
    with trio.fail_after(10):
        async with serving(store.device) as path:
            raw = await resuming(path)
            # Sent and shut down with no scheduling point between: the server sees both
            # at once, so it never waits (and flushes its replies) before the end.
            os.write(raw.sock.fileno(), message(5, Command.MIG_DATA_WRITE, write(good)) + tail)
            raw.sock.shutdown(socket.SHUT_WR)
            got = await raw.receive()
            with pytest.raises(EOFError):
                await raw.receive()
            raw.close()
    assert got.msg_id == 5 and not got.is_error
    torn = broken == "body-cut-short"
    assert store.resets == ([ResetReason.TORN_WRITE] if torn else [])
    assert store.state == (b"" if torn else good)


async def test_client_gone_inside_a_body_resets_the_device_and_commits_nothing() -> None:
    store = Store()
    head = b"c" * 1000
    with trio.fail_after(10):
        async with serving(store.device) as path:
            raw = await resuming(path)
            assert await raw.errno_of(Command.MIG_DATA_WRITE, write(head)) == 0
            body = write(b"d" * 500_000)
            message = struct.pack("=HHIII", 99, Command.MIG_DATA_WRITE, 16 + len(body), 0, 0)
            await raw.send_raw(message + body[:300_000])
            raw.close()
            await store.was_reset.wait()
            assert store.state == b""  # the reset dropped what was loaded
            assert store.device.state == MigState.RUNNING
            # The server serves the next client: it loads a whole stream.
            raw = await resuming(path)
            assert await raw.errno_of(Command.MIG_DATA_WRITE, write(head)) == 0
            raw.close()
    assert store.resets == [ResetReason.TORN_WRITE]
    assert store.asked == [1000, 500_000, 1000] and store.state == head


async def test_cancelled_inside_a_body_resets_the_device() -> None:
    store = Store()
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp, trio.fail_after(10):
        path = os.path.join(tmp, "s")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_vfio_user, path, store.device)
            raw = await resuming(path)
            body = write(b"e" * 200_000)
            message = struct.pack("=HHIII", 5, Command.MIG_DATA_WRITE, 16 + len(body), 0, 0)
            await raw.send_raw(message + body[:100_000])
            await store.buffer_asked.wait()
            nursery.cancel_scope.cancel()
        raw.close()
    assert store.resets == [ResetReason.TORN_WRITE] and store.state == b""


async def test_fds_sent_inside_a_body_are_closed() -> None:
    store = Store()
    r, w = os.pipe()
    before = copies_of(w)  # both ends
    body = write(b"f" * 300_000)
    try:
        with trio.fail_after(10):
            async with serving(store.device) as path:
                raw = await resuming(path)
                message = struct.pack("=HHIII", 7, Command.MIG_DATA_WRITE, 16 + len(body), 0, 0)
                await raw.send_raw(message + body[:100_000])
                await store.buffer_asked.wait()
                await raw.send_raw(body[100_000:200_000], fds=[w])  # mid-body
                await raw.send_raw(body[200_000:])
                got = await raw.receive()
                assert got.msg_id == 7 and not got.is_error
                assert copies_of(w) == before  # the server closed the one it received
                raw.close()
    finally:
        os.close(r)
        os.close(w)
    assert store.state == body[8:]


def copies_of(fd: int) -> int:
    """How many fds of this process refer to the same file (a pipe's two ends do)."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == target
        except OSError:
            pass
    return count


def test_both_halves_of_the_buffer_interface_are_needed() -> None:
    class Half(Store):
        write_commit = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match="write_buffer and write_commit"):
        Half()
