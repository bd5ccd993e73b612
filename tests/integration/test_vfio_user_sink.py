"""The vfio-user sink and source against vfiomig's server, over real UNIX sockets."""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from tests.integration.sink_helpers import failed_migration
from tests.vfio_user_raw import take_messages
from vfiomig._core._errors import SinkError, UsageError
from vfiomig._core._wire import wrap_config
from vfiomig.cli._specs import open_sink, open_source
from vfiomig.vfio_user import (
    BarDevice,
    MigState,
    ProtocolError,
    VfioUserCommandError,
    VfioUserDevice,
    VfioUserSink,
    VfioUserSource,
    serve_vfio_user,
)

LIMIT = 1024


@asynccontextmanager
async def serving(*devices: VfioUserDevice) -> AsyncIterator[list[str]]:
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
        paths = [os.path.join(tmp, f"s{i}") for i in range(len(devices))]
        async with trio.open_nursery() as nursery:
            for path, device in zip(paths, devices, strict=True):
                await nursery.start(serve_vfio_user, path, device)
            yield paths
            nursery.cancel_scope.cancel()


class Recorder(BarDevice):
    """Takes any stream, remembers it and the size of each write."""

    def __init__(self) -> None:
        super().__init__((8,))
        self.received = bytearray()

    def write_data(self, data: memoryview) -> int:
        self.write_sizes.append(len(data))
        self.received += data
        return len(data)

    def transition(self, state: MigState) -> None:
        self.transitions.append(state)


async def unix_listener(path: str) -> trio.socket.SocketType:
    """A listening UNIX socket for a scripted server."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    return listener


def pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([LIMIT - 1], [LIMIT - 1]),
        ([LIMIT], [LIMIT]),
        ([LIMIT + 1], [LIMIT, 1]),
        ([3 * LIMIT + 7], [LIMIT, LIMIT, LIMIT, 7]),
        ([10, LIMIT, 0, 5], [LIMIT, 15]),  # small chunks are gathered into full writes
        ([0], []),
    ],
)
@pytest.mark.parametrize("window", [1, 4])
async def test_sink_chunks_at_the_server_limit(
    sizes: list[int], expected: list[int], window: int
) -> None:
    emu = Recorder()
    data = pattern(sum(sizes))
    chunks: list[bytes] = []
    pos = 0
    for n in sizes:
        chunks.append(data[pos : pos + n])
        pos += n
    with trio.fail_after(5):
        async with serving(VfioUserDevice(emu, max_data_xfer_size=LIMIT)) as (path,):
            sink = VfioUserSink(path, window=window)
            await sink.start()
            await sink.write(chunks)
            await sink.finish()
            await sink.aclose()
    assert emu.write_sizes == expected
    assert bytes(emu.received) == data
    assert emu.transitions == [MigState.STOP, MigState.RESUMING, MigState.STOP]


async def test_sink_honours_its_own_smaller_limit() -> None:
    emu = Recorder()
    with trio.fail_after(5):
        async with serving(VfioUserDevice(emu, max_data_xfer_size=LIMIT)) as (path,):
            sink = VfioUserSink(path, max_data_xfer_size=100)
            await sink.start()
            await sink.write([memoryview(pattern(250))])
            await sink.finish()
            await sink.aclose()
    assert emu.write_sizes == [100, 100, 50]


async def test_sink_writes_at_most_32k_per_message_unless_told() -> None:
    # libvfio-user reads a message body with one recv(): above ~36 KiB a UNIX stream
    # socket may hand it over in pieces, which that server takes as an error.
    for spec, sizes in (
        ("", [32 << 10] * 3 + [4 << 10]),
        (",max-write=1M", [100 << 10]),
        (",max-write=40000", [40000, 40000, 22400]),
    ):
        emu = Recorder()
        with trio.fail_after(5):
            async with serving(VfioUserDevice(emu)) as (path,):  # the server allows 1 MiB
                sink = open_sink(f"vfio-user:{path}{spec}")
                await sink.start()
                await sink.write([pattern(100 << 10)])
                await sink.finish()
                await sink.aclose()
        assert emu.write_sizes == sizes, spec
        assert bytes(emu.received) == pattern(100 << 10)


def test_max_write_spec_errors() -> None:
    for bad in ("/s,max-write=", "/s,max-write=0", "/s,max-write=lots", ",max-write=1M"):
        with pytest.raises(UsageError):
            open_sink(f"vfio-user:{bad}")
    sink = open_sink("vfio-user:/tmp/a,b.sock,max-write=64K")
    assert isinstance(sink, VfioUserSink)
    assert (sink.path, sink.max_write) == ("/tmp/a,b.sock", 64 << 10)


async def test_abort_retries_the_reset_on_a_new_connection() -> None:
    # A server whose framing broke answers garbage on the old connection: abort must not
    # give up there.
    emu = Resets()
    with trio.fail_after(5):
        async with serving(VfioUserDevice(emu, max_data_xfer_size=LIMIT)) as (path,):
            sink = VfioUserSink(path)
            await sink.start()
            await sink.write([pattern(3 * LIMIT)])
            old = sink.client

            async def garbled() -> MigState:
                raise ProtocolError("server sent a reply to msg_id 7, which is not outstanding")

            old.get_state = garbled  # type: ignore[method-assign]
            await sink.abort()
            assert sink.client is not old and old.broken
            await sink.aclose()
    assert emu.resets == 1


class Flaky(Recorder):
    """Refuses the write that starts at stream offset ``fail_at`` with EIO, once."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.failed = False
        self.resets = 0

    def write_data(self, data: memoryview) -> int:
        if len(self.received) == self.fail_at and not self.failed:
            self.failed = True
            raise OSError(errno.EIO, "once")
        return super().write_data(data)

    def reset(self) -> None:
        self.resets += 1
        self.received.clear()


async def test_a_write_refused_mid_pipeline_fails_the_stream_and_abort_resets() -> None:
    # Writes in flight behind the refused one reach the device (the server keeps taking
    # writes), so the device must never leave RESUMING through STOP: abort resets it.
    emu = Flaky(3 * LIMIT)
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    with trio.fail_after(5):
        async with serving(device) as (path,):
            sink = VfioUserSink(path, window=8)
            await sink.start()
            sink.note_batch(10, 14)
            with pytest.raises(SinkError) as info:
                await sink.write([pattern(8 * LIMIT)])
                sink.note_batch(14, 15)
                await sink.write([pattern(LIMIT)])
                await sink.finish()
            assert device.state == MigState.RESUMING
            await sink.abort()
            await sink.aclose()
    err = info.value
    assert (err.errno, err.idx) == (errno.EIO, 10)
    text = str(err)
    assert (
        f"MIG_DATA_WRITE ({LIMIT} bytes at stream offset {3 * LIMIT}, data of idx 10..13)" in text
    )
    assert "failed with errno 5 (Input/output error)" in text
    assert "writes were in flight behind it" in text
    assert emu.failed and emu.resets == 1 and device.state == MigState.RUNNING
    assert emu.transitions == [MigState.STOP, MigState.RESUMING]  # never STOP again
    assert not emu.received  # the reset dropped what got past the gap


async def test_the_loader_reports_the_refused_writes_idx() -> None:
    # Through a receive session: the error line names the device and the idx whose data
    # the refused write carried (the loader may be writing later idx when it sees it).
    emu = Flaky(2 * LIMIT)
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    async with serving(device) as (path,):
        sink = VfioUserSink(path, window=64)
        err = await failed_migration(sink, size=16 * LIMIT, packet_size=LIMIT)
    assert err is not None
    assert err.startswith("d/0: ") and f"vfio-user {path}: MIG_DATA_WRITE" in err
    assert f"({LIMIT} bytes at stream offset {2 * LIMIT}, data of idx 2..2)" in err
    assert "failed with errno 5 (Input/output error)" in err
    assert emu.resets == 1 and device.state == MigState.RUNNING
    assert emu.transitions == [MigState.STOP, MigState.RESUMING]


async def test_sink_error_reply_names_command_and_errno() -> None:
    class Full(Recorder):
        def write_data(self, data: memoryview) -> int:
            if len(self.received) >= 2 * LIMIT:
                raise OSError(errno.ENOSPC, "full")
            return super().write_data(data)

    emu = Full()
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    with trio.fail_after(5):
        async with serving(device) as (path,):
            sink = VfioUserSink(path, window=4)
            await sink.start()
            with pytest.raises(SinkError) as info:
                await sink.write([pattern(5 * LIMIT)])
                await sink.finish()
            await sink.abort()
            await sink.aclose()
    assert info.value.errno == errno.ENOSPC
    text = str(info.value)
    assert text.startswith(f"vfio-user {path}: MIG_DATA_WRITE")
    assert f"at stream offset {2 * LIMIT}) failed with errno 28 (No space left on device)" in text
    # Writes 4 and 5 follow once half the window is answered: whether the fifth went out
    # before the refusal of the third was read depends on the server's pace.
    behind = re.search(r"; (\d) writes were in flight behind it \(0 taken, (\d) refused\)", text)
    assert behind is not None, text
    assert behind[1] == behind[2] and behind[1] in ("1", "2"), text
    assert device.state == MigState.RUNNING  # abort reset the device


async def test_sink_finish_reports_validation_failure_and_abort_resets() -> None:
    emu = BarDevice((0x100,))
    emu.bars[0][:4] = b"keep"
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    with trio.fail_after(5):
        async with serving(device) as (path,):
            sink = VfioUserSink(path)
            await sink.start()
            await sink.write([b"not a bar device stream"])
            with pytest.raises(
                VfioUserCommandError, match=r"\(SET STOP\) failed with errno 22"
            ) as info:
                await sink.finish()
            assert info.value.errno == errno.EINVAL
            assert device.state == MigState.RESUMING
            await sink.abort()
            assert device.state == MigState.RUNNING
            await sink.aclose()
            await sink.aclose()  # idempotent
    assert emu.bars[0] == bytes(0x100)  # the reset cleared the device


async def test_sink_abort_reconnects_when_the_connection_broke() -> None:
    emu = BarDevice((0x100,))
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    with trio.fail_after(5):
        async with serving(device) as (path,):
            sink = VfioUserSink(path)
            await sink.start()
            sink.client.broken = True  # as after a timeout or a cancelled write
            await sink.abort()
            await sink.aclose()
    assert device.state == MigState.RUNNING


async def test_sink_abort_never_raises_without_a_server(caplog: pytest.LogCaptureFixture) -> None:
    device = VfioUserDevice(Recorder(), max_data_xfer_size=LIMIT)
    with trio.fail_after(10):
        async with serving(device) as (path,):
            sink = VfioUserSink(path)
            await sink.start()
        sink.client.broken = True  # the server is gone: the reconnect fails too
        await sink.abort()
        await sink.aclose()
    assert "device reset after a failure did not work" in caplog.text


class Resets(Recorder):
    """Counts DEVICE_RESETs."""

    resets = 0

    def reset(self) -> None:
        self.resets += 1


async def test_sink_abort_leaves_a_device_it_never_moved() -> None:
    emu = Resets()
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    with trio.fail_after(5):
        async with serving(device) as (path,):
            sink = VfioUserSink(path)
            await sink.abort()  # the session failed before this device's start()
            await sink.aclose()
    assert emu.resets == 0 and emu.transitions == []


async def test_sink_abort_leaves_a_stopped_device_alone(caplog: pytest.LogCaptureFixture) -> None:
    # A start() cancelled between its two SETs (RUNNING -> STOP -> RESUMING) leaves the
    # device in STOP, where DEVICE_RESET is not allowed: nothing was loaded, nothing to undo.
    emu = Resets()
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    with trio.fail_after(5):
        async with serving(device) as (path,):
            sink = VfioUserSink(path)
            await sink.start()
            await sink.client.set_state(MigState.STOP)
            await sink.abort()
            await sink.aclose()
    assert device.state == MigState.STOP and emu.resets == 0
    assert "did not work" not in caplog.text


async def test_sink_requires_stop_copy() -> None:
    device = VfioUserDevice(BarDevice(), migration_flags=0b100)
    with trio.fail_after(5):
        async with serving(device) as (path,):
            sink = VfioUserSink(path)
            with pytest.raises(SinkError, match="migration flags 0x4 lack stop-copy") as info:
                await sink.start()
            await sink.aclose()
    assert info.value.errno == errno.ENOTSUP
    assert device.state == MigState.RUNNING


async def test_sink_connect_failure_keeps_oserror() -> None:
    sink = VfioUserSink("/nonexistent/vfio-user.sock")
    with trio.fail_after(5), pytest.raises(SinkError, match="connect failed") as info:
        await sink.start()
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value.__cause__, OSError)


async def test_sink_times_out_on_a_silent_server(autojump_clock: trio.abc.Clock) -> None:
    """A server that accepts and never answers: every wait is bounded."""
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
        path = os.path.join(tmp, "silent")
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen(1)
        with listener, trio.fail_after(120):
            sink = VfioUserSink(path, reply_timeout=30)
            with pytest.raises(SinkError, match="no reply within 30") as info:
                await sink.start()
            await sink.aclose()
    assert info.value.errno == errno.ETIMEDOUT


async def test_sink_server_closing_mid_request() -> None:
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
        path = os.path.join(tmp, "closer")
        listener = await unix_listener(path)

        async def accept_and_close() -> None:
            conn, _ = await listener.accept()
            await conn.recv(100)
            conn.close()

        with listener, trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_and_close)
                sink = VfioUserSink(path)
                with pytest.raises(SinkError, match="server closed the connection") as info:
                    await sink.start()
                await sink.aclose()
    assert info.value.errno == errno.ECONNRESET


async def test_a_cancelled_write_sends_nothing_and_leaves_the_client_in_step() -> None:
    emu = Recorder()
    with trio.fail_after(5):
        async with serving(VfioUserDevice(emu, max_data_xfer_size=LIMIT)) as (path,):
            sink = VfioUserSink(path)
            await sink.start()
            with trio.CancelScope() as scope:
                scope.cancel()
                await sink.write([b"x" * 10])
            assert not sink.client.broken
            await sink.write([b"y"])
            await sink.finish()
            await sink.aclose()
    assert bytes(emu.received) == b"y"


def test_specs_build_vfio_user_sink_and_source() -> None:
    sink = open_sink("vfio-user:/run/dev.sock")
    assert isinstance(sink, VfioUserSink) and sink.path == "/run/dev.sock"
    assert sink.description == "vfio-user:/run/dev.sock"
    source = open_source("vfio-user:/run/a,b.sock,config=/tmp/c.cfg")
    assert isinstance(source, VfioUserSource)
    assert (source.path, source.config_path) == ("/run/a,b.sock", "/tmp/c.cfg")
    plain = open_source("vfio-user:/run/dev.sock")
    assert isinstance(plain, VfioUserSource) and plain.config_path is None
    for bad in ("vfio-user:", "vfio-user:,config=x", "vfio-user:/s,config="):
        with pytest.raises(UsageError):
            (open_sink if bad == "vfio-user:" else open_source)(bad)


async def migrate(
    src_path: str, dst_path: str, *, packet: int = 4096, config: str | None = None
) -> bytes:
    source = VfioUserSource(src_path, config_path=config)
    sink = VfioUserSink(dst_path)
    try:
        await source.start()
        await sink.start()
        while data := await source.read(packet):
            assert len(data) <= packet
            await sink.write([data])
        blob = await source.config_blob()
        await source.finish()
        await sink.finish()
        return blob
    finally:
        await source.aclose()
        await sink.aclose()


@pytest.mark.parametrize("packet", [100, LIMIT, 5000])
async def test_source_to_sink_migrates_the_bars(packet: int) -> None:
    src = BarDevice((0x3000, 8))
    src.bars[0][:] = pattern(0x3000)
    src.bars[1][:] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    dst = BarDevice((0x3000, 8))
    devices = [VfioUserDevice(src, max_data_xfer_size=LIMIT), VfioUserDevice(dst)]
    with trio.fail_after(10):
        async with serving(*devices) as (src_path, dst_path):
            blob = await migrate(src_path, dst_path, packet=packet)
    assert blob == wrap_config(b"")
    assert dst.bars == src.bars
    assert src.transitions == [MigState.STOP, MigState.STOP_COPY, MigState.STOP]
    assert dst.transitions == [MigState.STOP, MigState.RESUMING, MigState.STOP]
    assert devices[0].state == devices[1].state == MigState.STOP


async def test_source_config_file() -> None:
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
        good = os.path.join(tmp, "good.config")
        bad = os.path.join(tmp, "bad.config")
        await trio.Path(good).write_bytes(wrap_config(b"pci config"))
        await trio.Path(bad).write_bytes(b"raw body without markers")
        assert await VfioUserSource("/x", config_path=good).config_blob() == wrap_config(
            b"pci config"
        )
        with pytest.raises(UsageError, match=r"bad\.config: .*config packet idx 0 starts with"):
            await VfioUserSource("/x", config_path=bad).config_blob()


async def test_source_read_stops_at_zero_bytes() -> None:
    class Dribble(BarDevice):
        """Returns at most 3 bytes per read, so short reads do not mean the end."""

        def read_data(self, size: int) -> bytes:
            return super().read_data(min(size, 3))

    src = Dribble((16,))
    src.bars[0][:] = pattern(16)
    with trio.fail_after(5):
        async with serving(VfioUserDevice(src)) as (path,):
            source = VfioUserSource(path)
            await source.start()
            parts: list[bytes] = []
            while data := await source.read(10):
                parts.append(bytes(data))
            assert await source.read(10) == b""
            await source.finish()
            await source.aclose()
    assert b"".join(parts) == src.state_bytes()
    assert [len(p) for p in parts[:-1]] == [10] * (len(parts) - 1)


async def stop_reading_after_an_error(
    conn: trio.socket.SocketType, server_path: str, *, task_status: trio.TaskStatus[None]
) -> None:
    """A proxy in front of a real server that stops reading from its client once it
    passed on an ERROR reply, as a server that hangs after refusing a write would."""
    client = trio.SocketStream(conn)
    server = await trio.open_unix_socket(server_path)
    refused = trio.Event()

    async def upstream() -> None:
        while not refused.is_set():  # at most one more receive once refused
            data = await client.receive_some(1 << 16)
            if not data:
                return
            await server.send_all(data)
        await trio.sleep_forever()

    async def downstream() -> None:
        pending = b""
        while data := await server.receive_some(1 << 16):
            messages, pending = take_messages(pending + data)
            for message in messages:
                await client.send_all(message)
                if int.from_bytes(message[8:12], "little") == 0x21:  # reply | error
                    refused.set()

    async with client, server, trio.open_nursery() as nursery:
        task_status.started()
        nursery.start_soon(upstream)
        nursery.start_soon(downstream)


async def test_a_refusal_is_seen_while_a_large_write_is_blocked() -> None:
    # 1 MiB writes fill the socket; the server refuses the first one and stops reading.
    # The reply reader must report the refusal at once, not after the 30 s send timeout.
    emu = Flaky(0)
    device = VfioUserDevice(emu)
    async with serving(device) as (server_path,):
        path = server_path + ".front"
        listener = await unix_listener(path)
        async with trio.open_nursery() as nursery:

            async def front() -> None:
                conn, _ = await listener.accept()
                await nursery.start(stop_reading_after_an_error, conn, server_path)

            nursery.start_soon(front)
            sink = VfioUserSink(path, max_write=1 << 20, reply_timeout=30, window=16)
            await sink.start()
            # No clock: a refusal seen only when the 30 s send timeout ends the write fails
            # with that timeout's error instead of the server's EIO checked below.
            with trio.fail_after(60), pytest.raises(SinkError) as info:
                await sink.write([bytes(64 << 20)])
                await sink.finish()
            await sink.aclose()
            nursery.cancel_scope.cancel()
        listener.close()
    assert info.value.errno == errno.EIO
    assert "MIG_DATA_WRITE (1048576 bytes at stream offset 0) failed with errno 5" in str(
        info.value
    )
    assert "unanswered" in str(info.value), info.value


async def test_source_data_after_the_end_is_a_protocol_error() -> None:
    class Resumes(BarDevice):
        """Ends its stream once, then has more: not a STOP_COPY stream."""

        reads = 0

        def read_data(self, size: int) -> bytes:
            self.reads += 1
            return b"" if self.reads == 2 else b"abc"

    with trio.fail_after(5):
        async with serving(VfioUserDevice(Resumes((16,)))) as (path,):
            source = VfioUserSource(path, window=4)
            await source.start()
            with pytest.raises(ProtocolError, match="returned 3 bytes after the end"):
                while await source.read(1 << 20):
                    pass
            await source.aclose()
