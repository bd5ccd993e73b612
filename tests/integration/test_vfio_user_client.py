"""The library client as a VMM against servers on real sockets: a busy server, several
tasks sharing one client, and a server whose DMA requests are wrong."""

from __future__ import annotations

import errno
import os
import socket
import struct
import tempfile

import pytest
import trio
import trio.testing

from vfiomig._core._errors import SinkError
from vfiomig.testing.vfio_user import VfioUserHarness, open_harness
from vfiomig.vfio_user import (
    IrqIndex,
    Region,
    SharedMemory,
    VfioUserDevice,
    open_vfio_user_client,
)
from vfiomig.vfio_user._header import FLAG_ERROR, FLAG_TYPE_REPLY, HEADER, Command
from vfiomig.vfio_user._layouts import region_info, sparse_mmap_cap
from vfiomig.vfio_user._version import Capabilities, Version


def memory_device(size: int = 0x1000) -> tuple[bytearray, VfioUserDevice]:
    bar = bytearray(size)

    def read(offset: int, count: int) -> bytes:
        return bytes(bar[offset : offset + count])

    def write(offset: int, data: memoryview) -> None:
        bar[offset : offset + len(data)] = data

    return bar, VfioUserDevice(regions={0: Region(size, read=read, write=write)})


async def test_a_busy_server_is_named_as_such(vfio_user: VfioUserHarness) -> None:
    _, device = memory_device()
    with trio.fail_after(20):
        await vfio_user.attach(device)  # the VMM
        path = await vfio_user.serve(device)
        with pytest.raises(SinkError, match="serving another client") as info:
            await open_vfio_user_client(path, reply_timeout=5)
    # vfiomig's server answers a second client's VERSION with EBUSY
    assert info.value.errno == errno.EBUSY
    assert "serves one client at a time" in str(info.value)


async def test_tasks_share_one_client(vfio_user: VfioUserHarness) -> None:
    bar, device = memory_device()
    bar[:] = bytes(range(256)) * 16
    with trio.fail_after(20):
        client = await vfio_user.attach(device)  # its request server runs too
        got: dict[int, bytes] = {}

        async def read(offset: int) -> None:
            for _ in range(20):
                got[offset] = await client.region_read(0, offset, 256)

        async with trio.open_nursery() as nursery:
            for offset in range(0, 0x1000, 256):
                nursery.start_soon(read, offset)
    assert b"".join(got[o] for o in sorted(got)) == bytes(bar)


async def answer_version(conn: trio.socket.SocketType) -> None:
    """A fake server's side of VERSION: read the client's, answer with ours."""
    head = await conn.recv(16)
    msg_id, command, size, _, _ = HEADER.unpack(head)
    await conn.recv(size - 16)
    body = Version(0, 0, Capabilities()).pack()
    await conn.send(HEADER.pack(msg_id, command, 16 + len(body), FLAG_TYPE_REPLY, 0) + body)


async def fake_server(
    path: str,
    requests: list[bytes],
    replies: list[bytes],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept one client, answer its VERSION, send ``requests`` (DMA_* from the server)
    and collect the client's replies."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    task_status.started()
    conn, _ = await listener.accept()
    with conn, listener:
        await answer_version(conn)
        for i, payload in enumerate(requests):
            command = Command.DMA_WRITE if len(payload) > 16 else Command.DMA_READ
            await conn.send(HEADER.pack(100 + i, command, 16 + len(payload), 0, 0) + payload)
            reply = b""
            while len(reply) < 16 or len(reply) < HEADER.unpack_from(reply)[2]:
                reply += await conn.recv(4096)
            replies.append(reply)


async def test_wrong_dma_requests_get_an_errno_and_the_client_goes_on() -> None:
    with tempfile.TemporaryDirectory(prefix="vuc", dir="/tmp") as tmp, trio.fail_after(20):
        path = os.path.join(tmp, "s")
        replies: list[bytes] = []
        requests = [
            struct.pack("=QQ", 0x1000, 1 << 30),  # more than we advertised
            struct.pack("=QQ", 0x9000, 8),  # no guest memory there
            struct.pack("=QQ", 0x1000, 4) + b"ab",  # a DMA_WRITE carrying 2 of 4 bytes
            struct.pack("=QQ", 0x1FFC, 4),  # fine
        ]
        async with trio.open_nursery() as nursery:
            await nursery.start(fake_server, path, requests, replies)
            async with await open_vfio_user_client(path, reply_timeout=5) as client:
                client.guest.allocate(0x1000, 0x1000, flags=3, shared=False)
                client.guest.write(0x1FFC, b"WXYZ")
                # The fake hangs up after its last reply: serving ends at its EOF.
                await client.serve_requests()
            assert client.requests_served == len(requests)
    heads = [HEADER.unpack_from(r) for r in replies]
    assert [(h[0], h[3] & FLAG_ERROR and h[4]) for h in heads] == [
        (100, errno.EINVAL),
        (101, errno.EFAULT),
        (102, errno.EINVAL),
        (103, 0),
    ]
    assert replies[3][16:] == struct.pack("=QQ", 0x1FFC, 4) + b"WXYZ"


async def test_the_client_leaves_no_fd_behind() -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    memory = SharedMemory(0x2000, "bar")
    device = VfioUserDevice(
        regions={0: Region(0x2000, memory=memory, mmap_areas=[(0, 0x2000)])},
        irqs={IrqIndex.MSI: 4},
    )
    with trio.fail_after(20):
        async with open_harness() as vfio_user:
            client = await vfio_user.attach(device)
            await client.map_dma(0x10000, 0x1000)
            await client.map_dma(0x20000, 0x1000, with_fd=False)
            await client.set_irq_eventfds(IrqIndex.MSI, 0, 4)
            mapped = await client.map_region(0)
            with mapped.view(0, 4) as view:
                view[:] = b"abcd"
            assert await client.region_read(0, 0, 4) == b"abcd"
            await client.region(0)
    memory.close()
    after = sorted(os.listdir("/proc/self/fd"))
    assert after == before


async def test_a_request_cancelled_before_it_went_out_leaves_the_client_in_step() -> None:
    bar, device = memory_device()
    bar[:4] = b"abcd"
    with trio.fail_after(20):
        async with open_harness() as vfio_user:
            path = await vfio_user.serve(device)
            async with await open_vfio_user_client(path, reply_timeout=5) as client:
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await client.region_read(0, 0, 4)
                assert not client.broken
                assert client._channel.idle  # nothing outstanding: pipelines may run
                assert await client.region_read(0, 0, 4) == b"abcd"


async def fake_region_server(
    path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer VERSION, then two pipelined GET_REGION_INFOs together: region 0's reply (no
    fd) and region 1's (mmappable, its fd in the same sendmsg) back to back, so the client
    reads both in one receive."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    task_status.started()
    conn, _ = await listener.accept()
    with conn, listener:
        await answer_version(conn)
        asked: dict[int, int] = {}  # region index -> msg_id
        data = b""
        while len(asked) < 2:
            data += await conn.recv(4096)
            while len(data) >= 16 and len(data) >= HEADER.unpack_from(data)[2]:
                msg_id, command, size, _, _ = HEADER.unpack_from(data)
                assert command == Command.DEVICE_GET_REGION_INFO
                asked[struct.unpack_from("=I", data, 16 + 8)[0]] = msg_id
                data = data[size:]
        plain = region_info(argsz=32, flags=3, index=0, cap_offset=0, size=0x1000, offset=0)
        cap = sparse_mmap_cap([(0, 0x1000)])
        mappable = (
            region_info(
                argsz=32 + len(cap), flags=0xF, index=1, cap_offset=32, size=0x1000, offset=0
            )
            + cap
        )
        first = HEADER.pack(asked[0], Command.DEVICE_GET_REGION_INFO, 48, FLAG_TYPE_REPLY, 0)
        second = HEADER.pack(
            asked[1], Command.DEVICE_GET_REGION_INFO, 16 + len(mappable), FLAG_TYPE_REPLY, 0
        )
        memfd = os.memfd_create("bar1")
        os.ftruncate(memfd, 0x1000)
        try:
            # Both sent without a checkpoint between them (the client runs in this
            # thread too), on a dup of the non-blocking socket: nothing here can block.
            raw = socket.socket(fileno=os.dup(conn.fileno()))
            with raw:
                raw.sendall(first + plain)
                raw.sendmsg(
                    [second + mappable],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", memfd))],
                )
        finally:
            os.close(memfd)
        await conn.recv(1)  # until the client hangs up


async def test_an_fd_goes_to_the_reply_it_came_with_when_replies_are_read_together() -> None:
    """Two pipelined REGION_INFO replies read in one receive: the fd is the second's (it
    ends the read), not the first's (which merely starts in it)."""
    with tempfile.TemporaryDirectory(prefix="vuc", dir="/tmp") as tmp, trio.fail_after(20):
        path = os.path.join(tmp, "s")
        got: dict[int, object] = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(fake_region_server, path)
            async with await open_vfio_user_client(path, reply_timeout=5) as client:

                async def region0() -> None:
                    got[0] = await client.region(0)

                async def region1() -> None:
                    got[1] = await client.map_region(1)

                async with trio.open_nursery() as both:
                    both.start_soon(region0)
                    await trio.testing.wait_all_tasks_blocked()
                    both.start_soon(region1)
    assert 1 in got and 0 in got
