"""The vfio-user server's libvfio-user rules, exercised by a client over real UNIX sockets."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
import trio
import trio.testing

from tests.vfio_user_raw import serving
from vfiomig.vfio_user import (
    BarDevice,
    MigState,
    VfioUserClient,
    VfioUserCommandError,
    VfioUserDevice,
    open_vfio_user_client,
)
from vfiomig.vfio_user._header import HEADER, Command
from vfiomig.vfio_user._layouts import RegionRead
from vfiomig.vfio_user._migration_bodies import DeviceFeature, MigDataRead, MigDataWrite
from vfiomig.vfio_user._protocol import encode_message
from vfiomig.vfio_user._version import Capabilities, Version

LIMIT = 1024  # the server's max_data_xfer_size in these tests


def bar_device(sizes: tuple[int, ...] = (0x300, 8)) -> tuple[BarDevice, VfioUserDevice]:
    emu = BarDevice(sizes)
    return emu, VfioUserDevice(emu, max_data_xfer_size=LIMIT)


async def client_for(path: str, **kwargs: object) -> VfioUserClient:
    return await open_vfio_user_client(path, reply_timeout=5, **kwargs)  # type: ignore[arg-type]


class RawClient:
    """Speaks bytes directly, for requests our client refuses to build."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, path: str, *, version: bool = True) -> RawClient:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        raw = cls(trio.SocketStream(sock))
        if version:
            await raw.send(Command.VERSION, Version(0, 0).pack())
            hdr, _ = await raw.receive()
            assert hdr[4] == 0
        return raw

    async def send(self, command: int, payload: bytes, msg_id: int = 1) -> None:
        await self.stream.send_all(encode_message(msg_id, command, payload))

    async def receive(self) -> tuple[tuple[int, ...], bytes]:
        """(header fields, payload); header fields = msg_id, cmd, size, flags, error_no."""
        while True:
            if len(self.buf) >= 16:
                hdr = HEADER.unpack_from(self.buf)
                if len(self.buf) >= hdr[2]:
                    payload = bytes(self.buf[16 : hdr[2]])
                    del self.buf[: hdr[2]]
                    return hdr, payload
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buf += data

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def errno_of(self, command: int, payload: bytes) -> int:
        await self.send(command, payload)
        hdr, _ = await self.receive()
        return int(hdr[4]) if hdr[3] & 0x20 else 0


async def test_initial_state_is_running_and_capabilities_are_advertised() -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            assert await client.get_state() == MigState.RUNNING
            caps = client.server_capabilities
            assert caps.max_data_xfer_size == LIMIT
            assert caps.migration is not None and caps.migration.pgsize == 4096
            assert client.data_limit == LIMIT
            assert await client.get_migration_flags() == 0b101  # STOP_COPY | PRE_COPY


async def test_one_set_resuming_walks_running_stop_resuming() -> None:
    emu, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            request = DeviceFeature.set_state(MigState.RESUMING).pack()
            await raw.send(Command.DEVICE_FEATURE, request)
            hdr, payload = await raw.receive()
            assert hdr[3] == 1 and payload == request  # a SET reply echoes the request
            await raw.aclose()
    assert emu.transitions == [MigState.STOP, MigState.RESUMING]
    assert device.state == MigState.RESUMING


async def test_client_walks_direct_arcs() -> None:
    emu, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.set_state(MigState.STOP_COPY)
            assert await client.get_state() == MigState.STOP_COPY
            await client.set_state(MigState.RESUMING)
    assert emu.transitions == [
        MigState.STOP,
        MigState.STOP_COPY,
        MigState.STOP,
        MigState.RESUMING,
    ]


async def test_forbidden_transition_is_einval() -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            for state in (MigState.STOP_COPY, MigState.PRE_COPY):
                payload = DeviceFeature.set_state(state).pack()
                got = await raw.errno_of(Command.DEVICE_FEATURE, payload)
                assert got == (0 if state == MigState.STOP_COPY else errno.EINVAL)
            for bad in (MigState.ERROR, MigState.RUNNING_P2P, 8, 0xFFFF):
                payload = struct.pack("=IIII", 16, 0x20002, bad, 0xFFFFFFFF)
                assert await raw.errno_of(Command.DEVICE_FEATURE, payload) == errno.EINVAL
            await raw.aclose()
    assert device.state == MigState.STOP_COPY


@pytest.mark.parametrize(
    "flags",
    [
        0x10000 | 0x20000 | 2,  # GET and SET together
        0x20000 | 1,  # SET MIGRATION
        0x10000 | 6,  # DMA logging: not offered
        0x80000 | 0x10000 | 2,  # an unknown op bit
        2,  # no op at all
    ],
)
async def test_bad_device_feature_is_einval(flags: int) -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            payload = struct.pack("=IIII", 16, flags, 0, 0)
            assert await raw.errno_of(Command.DEVICE_FEATURE, payload) == errno.EINVAL
            await raw.aclose()


async def test_probe_echoes_the_request() -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            probe = struct.pack("=II", 8, 0x40000 | 0x10000 | 1)
            await raw.send(Command.DEVICE_FEATURE, probe)
            hdr, payload = await raw.receive()
            assert hdr[3] == 1 and payload == probe
            await raw.aclose()


@pytest.mark.parametrize("state", [MigState.RUNNING, MigState.STOP, MigState.STOP_COPY])
async def test_mig_data_write_only_in_resuming(state: MigState) -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.set_state(state)
            with pytest.raises(VfioUserCommandError) as info:
                await client.write_data([b"x" * 10])
                await client.flush()
    assert info.value.errno == errno.EINVAL
    assert info.value.command == Command.MIG_DATA_WRITE
    assert "MIG_DATA_WRITE (10 bytes at stream offset 0) failed with errno 22" in str(info.value)
    assert os.strerror(errno.EINVAL) in str(info.value)


@pytest.mark.parametrize("state", [MigState.RUNNING, MigState.STOP, MigState.RESUMING])
async def test_mig_data_read_only_in_stop_copy_or_pre_copy(state: MigState) -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.set_state(state)
            with pytest.raises(VfioUserCommandError, match="MIG_DATA_READ failed") as info:
                await client.read_data(16)
    assert info.value.errno == errno.EINVAL


async def test_mig_data_read_in_pre_copy_and_stop_copy() -> None:
    emu, device = bar_device()
    emu.bars[0][:4] = b"abcd"
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.set_state(MigState.PRE_COPY)
            assert await client.read_data(64) == b""  # BarDevice sends nothing in precopy
            await client.set_state(MigState.STOP_COPY)
            stream = bytearray()
            while chunk := await client.read_data(100):
                assert len(chunk) <= 100
                stream += chunk
    assert bytes(stream) == emu.state_bytes()


async def test_partial_write_is_einval() -> None:
    emu, device = bar_device((16,))
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.set_state(MigState.RESUMING)
            whole = len(emu.state_bytes())
            with pytest.raises(VfioUserCommandError) as info:
                await client.write_data([b"\0" * (whole + 5)])  # 5 more than the device takes
                await client.flush()
    assert info.value.errno == errno.EINVAL
    assert emu.write_sizes == [whole + 5]


class FailingDevice(BarDevice):
    """Fails write_data with a chosen errno after ``good`` writes."""

    def __init__(self, code: int, good: int = 0) -> None:
        super().__init__((4 * LIMIT,))
        self.code = code
        self.good = good

    def write_data(self, data: memoryview) -> int:
        if self.good == 0:
            raise OSError(self.code, "injected")
        self.good -= 1
        return super().write_data(data)


async def test_write_callback_errno_surfaces_with_offset() -> None:
    emu = FailingDevice(errno.ENOSPC, good=2)
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path, window=1) as client:
            await client.set_state(MigState.RESUMING)
            with pytest.raises(VfioUserCommandError) as info:
                await client.write_data([b"x" * (2 * LIMIT + 30)])
                await client.flush()
    assert info.value.errno == errno.ENOSPC
    assert f"(30 bytes at stream offset {2 * LIMIT}) failed with errno 28" in str(info.value)


async def test_failed_validation_keeps_resuming() -> None:
    emu, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.set_state(MigState.RESUMING)
            await client.write_data([emu.state_bytes()[:10]])
            with pytest.raises(VfioUserCommandError, match=r"DEVICE_FEATURE \(SET STOP\)") as info:
                await client.set_state(MigState.STOP)
            assert info.value.errno == errno.EINVAL
            assert await client.get_state() == MigState.RESUMING


async def test_only_some_commands_run_while_stopped() -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.set_state(MigState.STOP)
            assert await client.region_read(0, 0, 4) == bytes(4)  # allowed in STOP
            with pytest.raises(VfioUserCommandError, match="DEVICE_GET_REGION_INFO"):
                await client.region_info(0)
            with pytest.raises(VfioUserCommandError, match="DEVICE_RESET"):
                await client.reset()
            await client.set_state(MigState.STOP_COPY)
            with pytest.raises(VfioUserCommandError, match="REGION_READ") as info:
                await client.region_read(0, 0, 4)  # no region but migration's in STOP_COPY
            assert info.value.errno == errno.EINVAL
            assert await client.read_data(8)  # MIG_DATA_READ is allowed
            await client.set_state(MigState.RUNNING)
            info_reply = await client.region_info(0)
            assert (info_reply.size, info_reply.flags) == (0x300, 3)


async def test_region_access_is_bounds_checked() -> None:
    emu, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.region_write(0, 0x2F0, b"0123456789abcdef")
            assert emu.bars[0][0x2F0:] == b"0123456789abcdef"
            assert await client.region_read(0, 0x2F0, 16) == b"0123456789abcdef"
            for index, offset, count in ((0, 0x2F1, 16), (2, 0, 1), (1, 0, 9)):
                with pytest.raises(VfioUserCommandError) as info:
                    await client.region_read(index, offset, count)
                assert info.value.errno == errno.EINVAL
            with pytest.raises(VfioUserCommandError, match="DEVICE_GET_REGION_INFO"):
                await client.region_info(2)


async def test_message_size_limits() -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path)  # advertised the default 1 MiB
            payload = DeviceFeature.set_state(MigState.RESUMING).pack()
            assert await raw.errno_of(Command.DEVICE_FEATURE, payload) == 0
            # Above the server's message limit: skipped, EINVAL, the connection goes on.
            big = MigDataWrite.of(b"x" * (device.max_msg_size)).pack()
            assert await raw.errno_of(Command.MIG_DATA_WRITE, big) == errno.EINVAL
            # argsz too small for size.
            short_argsz = struct.pack("=II", 8, 4) + b"abcd"
            assert await raw.errno_of(Command.MIG_DATA_WRITE, short_argsz) == errno.EINVAL
            # size larger than the data it carries.
            lying = struct.pack("=II", 20, 12) + b"abcd"
            assert await raw.errno_of(Command.MIG_DATA_WRITE, lying) == errno.EINVAL
            # A region access larger than max_data_xfer_size.
            read = RegionRead(0, 0, LIMIT + 1).pack()
            assert await raw.errno_of(Command.REGION_READ, read) == errno.EINVAL
            # Unimplemented commands.
            assert await raw.errno_of(Command.DMA_MAP, b"\0" * 32) == errno.EINVAL
            assert await raw.errno_of(Command.VERSION, Version(0, 0).pack()) == errno.EINVAL
            await raw.aclose()


async def test_write_size_bounded_by_client_advertised_limit() -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path, version=False)
            caps = b'{"capabilities":{"max_data_xfer_size":16}}\0'
            await raw.send(Command.VERSION, struct.pack("=HH", 0, 0) + caps)
            await raw.receive()
            payload = DeviceFeature.set_state(MigState.RESUMING).pack()
            assert await raw.errno_of(Command.DEVICE_FEATURE, payload) == 0
            ok = MigDataWrite.of(b"x" * 16).pack()
            assert await raw.errno_of(Command.MIG_DATA_WRITE, ok) == 0
            too_big = MigDataWrite.of(b"x" * 17).pack()
            assert await raw.errno_of(Command.MIG_DATA_WRITE, too_big) == errno.EINVAL
            await raw.aclose()


@pytest.mark.parametrize(
    "first",
    [
        encode_message(1, Command.DEVICE_RESET, b""),
        encode_message(1, Command.VERSION, struct.pack("=HH", 1, 0)),
        encode_message(1, Command.VERSION, struct.pack("=HH", 0, 0) + b"{bad json\0"),
    ],
)
async def test_first_message_must_be_a_good_version(first: bytes) -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path, version=False)
            await raw.stream.send_all(first)
            hdr, _ = await raw.receive()
            assert hdr[3] & 0x20 and hdr[4] == errno.EINVAL
            with pytest.raises(EOFError):
                await raw.receive()
            await raw.aclose()
            # The server is still there for the next client.
            async with await client_for(path) as client:
                assert await client.get_state() == MigState.RUNNING


async def test_framing_error_drops_only_the_client() -> None:
    _, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            await raw.stream.send_all(HEADER.pack(1, 13, 8, 0, 0))  # msg_size below 16
            with pytest.raises(EOFError):
                await raw.receive()
            await raw.aclose()
            async with await client_for(path) as client:
                assert await client.get_state() == MigState.RUNNING


async def test_state_survives_reconnect() -> None:
    src = BarDevice((0x300, 8))
    src.bars[0][:] = bytes(range(256)) * 3
    src.bars[1][:] = b"survives"
    stream = src.state_bytes()
    emu, device = bar_device()
    with trio.fail_after(5):
        async with serving(device) as path:
            async with await client_for(path) as client:
                await client.set_state(MigState.RESUMING)
                await client.write_data([stream[:500]])
                await client.flush()
            async with await client_for(path) as client:
                assert await client.get_state() == MigState.RESUMING
                await client.write_data([stream[500:]])
                await client.set_state(MigState.STOP)
                await client.set_state(MigState.RUNNING)
                assert await client.region_read(1, 0, 8) == b"survives"
    assert emu.bars == src.bars


async def test_reset_returns_to_running() -> None:
    emu, device = bar_device()
    emu.bars[1][:] = b"dirtydir"
    with trio.fail_after(5):
        async with serving(device) as path, await client_for(path) as client:
            await client.set_state(MigState.RESUMING)
            await client.write_data([b"partial"])
            await client.reset()
            assert await client.get_state() == MigState.RUNNING
    assert emu.bars[1] == bytes(8)


async def test_pipelined_replies_come_in_request_order() -> None:
    """Bare-header replies are queued and sent in batches: a refusal and a reply with a
    payload in the middle of pipelined writes still come back in request order."""
    emu = FailingDevice(errno.ENOSPC, good=3)
    device = VfioUserDevice(emu, max_data_xfer_size=LIMIT)
    device.migration.set_state(MigState.RESUMING)  # type: ignore[union-attr]
    write = MigDataWrite.of(b"w" * 100).pack()
    requests = [
        (Command.MIG_DATA_WRITE, write),
        (Command.MIG_DATA_WRITE, write),
        (Command.REGION_READ, RegionRead(0, 0, 4).pack()),
        (Command.MIG_DATA_WRITE, write),
        (Command.MIG_DATA_WRITE, write),  # the fourth write: ENOSPC
        (Command.MIG_DATA_WRITE, write),  # ENOSPC again
    ]
    with trio.fail_after(5):
        async with serving(device) as path:
            raw = await RawClient.connect(path)
            await raw.stream.send_all(
                b"".join(
                    encode_message(msg_id, cmd, payload)
                    for msg_id, (cmd, payload) in enumerate(requests, start=10)
                )
            )
            replies = [await raw.receive() for _ in requests]
            await raw.aclose()
    assert [(hdr[0], hdr[1], hdr[4]) for hdr, _ in replies] == [
        (10, Command.MIG_DATA_WRITE, 0),
        (11, Command.MIG_DATA_WRITE, 0),
        (12, Command.REGION_READ, 0),
        (13, Command.MIG_DATA_WRITE, 0),
        (14, Command.MIG_DATA_WRITE, errno.ENOSPC),
        (15, Command.MIG_DATA_WRITE, errno.ENOSPC),
    ]
    assert len(replies[2][1]) == 16 + 4


class CountingDevice(BarDevice):
    """A stream of ``size``-byte reads, read ``n`` filled with byte ``n % 251``."""

    def __init__(self) -> None:
        super().__init__((16,))
        self.reads = 0

    def read_data(self, size: int) -> bytes:
        self.reads += 1
        return bytes([self.reads % 251]) * size


async def test_large_read_replies_survive_a_slow_reader() -> None:
    """More 1 MiB MIG_DATA_READ replies than the socket buffers: the server sends each in
    parts as the client reads, whole and in order."""
    big = 1 << 20
    emu = CountingDevice()
    device = VfioUserDevice(emu, max_data_xfer_size=big)
    device.migration.set_state(MigState.STOP_COPY)  # type: ignore[union-attr]
    count = 24  # 24 MiB: more than the send buffer (4 MiB, doubled by the kernel)
    with trio.fail_after(20):
        async with serving(device) as path:
            raw = await RawClient.connect(path, version=False)
            caps = Capabilities(max_data_xfer_size=big)
            await raw.send(Command.VERSION, Version(0, 0, caps).pack())
            hdr, _ = await raw.receive()
            assert hdr[4] == 0
            request = MigDataRead.for_size(big).pack()
            await raw.stream.send_all(
                b"".join(encode_message(i, Command.MIG_DATA_READ, request) for i in range(count))
            )
            await trio.testing.wait_all_tasks_blocked()  # the server filled the socket: it waits
            for i in range(count):
                hdr, payload = await raw.receive()
                assert (hdr[0], hdr[4]) == (i, 0)
                assert payload[8:] == bytes([(i + 1) % 251]) * big
            await raw.aclose()
