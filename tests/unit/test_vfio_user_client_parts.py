"""The client's sans-IO parts: answering the server's DMA requests from guest memory (every
field checked), reading GET_REGION_INFO capabilities and GET_REGION_IO_FDS replies, and
the PCI config space blob and its replay order."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vfiomig._core._errors import ConfigStateError
from vfiomig.vfio_user._device_info import sparse_areas
from vfiomig.vfio_user._header import Command, ProtocolError
from vfiomig.vfio_user._layouts import (
    DMA_FLAG_READ,
    DMA_FLAG_WRITE,
    IO_FDS,
    REGION_INFO,
    SUB_REGION_IOEVENTFD,
    RegionInfo,
    sparse_mmap_cap,
)
from vfiomig.vfio_user._messages import Opaque
from vfiomig.vfio_user._protocol import ClientConnection, Header, Message, encode_message
from vfiomig.vfio_user.client import GuestMemory, RegionIoFd
from vfiomig.vfio_user.client._config_space import decode, encode, replay_plan
from vfiomig.vfio_user.client._io_fds import parse_io_fds

ACCESS = struct.Struct("=QQ")


def request(command: Command, payload: bytes) -> Message:
    return Message(Header(7, command, 16 + len(payload)), Opaque(payload))


@pytest.fixture
def guest() -> Iterator[GuestMemory]:
    memory = GuestMemory(max_count=0x2000)
    memory.allocate(0x10000, 0x2000, flags=DMA_FLAG_READ | DMA_FLAG_WRITE, shared=True)
    memory.allocate(0x20000, 0x1000, flags=DMA_FLAG_READ, shared=False)
    yield memory
    memory.close()


def test_dma_read_and_write_are_served_from_guest_memory(guest: GuestMemory) -> None:
    guest.write(0x10FFE, b"abcd")
    reply = guest.serve(request(Command.DMA_READ, ACCESS.pack(0x10FFE, 4)))
    assert bytes(reply) == ACCESS.pack(0x10FFE, 4) + b"abcd"
    reply = guest.serve(request(Command.DMA_WRITE, ACCESS.pack(0x11000, 3) + b"xyz"))
    assert bytes(reply) == ACCESS.pack(0x11000, 3)
    assert guest.read(0x10FFE, 5) == b"abxyz"
    assert (guest.reads, guest.writes) == (1, 1)


@pytest.mark.parametrize(
    ("command", "payload", "code"),
    [
        (Command.DMA_READ, b"\0" * 15, errno.EINVAL),  # shorter than addr + count
        (Command.DMA_READ, ACCESS.pack(0x10000, 0), errno.EINVAL),  # nothing to read
        (Command.DMA_READ, ACCESS.pack(0x10000, 0x2001), errno.EINVAL),  # above our limit
        (Command.DMA_READ, ACCESS.pack(0x10000, 4) + b"x", errno.EINVAL),  # a read with data
        (Command.DMA_WRITE, ACCESS.pack(0x10000, 4) + b"xyz", errno.EINVAL),  # 3 of 4 bytes
        (Command.DMA_READ, ACCESS.pack(2**64 - 2, 4), errno.EINVAL),  # wraps
        (Command.DMA_READ, ACCESS.pack(0x11FFF, 2), errno.EFAULT),  # past the region
        (Command.DMA_READ, ACCESS.pack(0x30000, 2), errno.EFAULT),  # not guest memory
        (Command.DMA_READ, ACCESS.pack(0x1FFFF, 2), errno.EFAULT),  # across two regions
        (Command.DMA_WRITE, ACCESS.pack(0x20000, 1) + b"x", errno.EACCES),  # read-only
    ],
)
def test_bad_dma_requests_are_refused_whole(
    guest: GuestMemory, command: Command, payload: bytes, code: int
) -> None:
    before = guest.read(0x10000, 0x2000) + guest.read(0x20000, 0x1000)
    with pytest.raises(OSError) as info:
        guest.serve(request(command, payload))
    assert info.value.errno == code
    assert guest.read(0x10000, 0x2000) + guest.read(0x20000, 0x1000) == before


def test_guest_memory_ranges_are_checked() -> None:
    memory = GuestMemory(max_count=4096)
    try:
        memory.allocate(0x1000, 0x1000, flags=DMA_FLAG_READ, shared=True)
        for iova, size in ((0x1000, 0x1000), (0, 0x2000), (0x2001, 0x1000), (0x3000, 0)):
            with pytest.raises(ValueError, match="guest memory"):
                memory.allocate(iova, size, flags=DMA_FLAG_READ, shared=True)
        with pytest.raises(OSError, match="not one region"):
            memory.read(0x1FFF, 2)
    finally:
        memory.close()


def info_with(caps: bytes, *, cap_offset: int = 32, size: int = 0x4000) -> RegionInfo:
    return RegionInfo(32 + len(caps), 2, 0xF, cap_offset, size, 0, caps)


def test_sparse_areas_are_read_from_the_capability_chain() -> None:
    assert sparse_areas(info_with(sparse_mmap_cap([(0, 0x1000), (0x2000, 0x2000)]))) == [
        (0, 0x1000),
        (0x2000, 0x2000),
    ]
    assert sparse_areas(info_with(b"", cap_offset=0)) == []


@pytest.mark.parametrize(
    ("caps", "cap_offset", "match"),
    [
        (sparse_mmap_cap([(0x3000, 0x2000)]), 32, "outside the region"),
        (sparse_mmap_cap([(0, 0x1000)])[:-1], 32, "too short"),
        (sparse_mmap_cap([(0, 0x1000)]), 8, "outside the reply"),
        (sparse_mmap_cap([(0, 0x1000)]), 56, "outside the reply"),
        (struct.pack("=HHIII", 9, 1, 32, 0, 0), 32, "points back"),
        (struct.pack("=HHIII", 1, 1, 0, 5000, 0), 32, "areas 5000"),
    ],
)
def test_bad_capabilities_are_protocol_errors(caps: bytes, cap_offset: int, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        sparse_areas(info_with(caps, cap_offset=cap_offset))


@given(st.binary(max_size=200), st.integers(0, 300), st.integers(0, 2**64 - 1))
def test_any_capability_bytes_read_or_raise_our_error(
    caps: bytes, cap_offset: int, size: int
) -> None:
    info = RegionInfo.unpack(
        memoryview(REGION_INFO.pack(32 + len(caps), 0xF, 2, cap_offset, size, 0) + caps)
    )
    try:
        areas = sparse_areas(info)
    except ProtocolError:
        return
    assert all(length > 0 and offset + length <= size for offset, length in areas)


def config_space() -> bytearray:
    space = bytearray(256)
    struct.pack_into("<HHHH", space, 0, 0x1234, 0x11E5, 0x0406, 0x10)
    space[0x34] = 0x40
    space[0x40:0x42] = bytes([0x05, 0x60])  # MSI, 64-bit, per-vector masking
    struct.pack_into("<HIIHHI", space, 0x42, 0x0181, 0xFEE00000, 0, 0x4021, 0, 1)
    space[0x60:0x62] = bytes([0x11, 0x00])  # MSI-X, the end of the list
    return space


def test_config_space_blob_round_trips_and_refuses_what_it_cannot_read() -> None:
    space = bytes(config_space())
    assert decode("dev", encode(space)) == space
    assert decode("dev", b"") is None  # an empty body: nothing carried
    assert decode("dev", b"QEMU's own state") is None  # a VMM's config state
    with pytest.raises(ConfigStateError, match="version 2"):
        decode("dev", struct.pack("=IHHI", 0x55504656, 2, 0, 256) + space)
    with pytest.raises(ConfigStateError, match="255 bytes"):
        decode("dev", struct.pack("=IHHI", 0x55504656, 1, 0, 255) + space[:255])


def test_replay_writes_addresses_before_enables_and_the_command_last() -> None:
    plan = replay_plan(bytes(config_space()))
    names = [w.what for w in plan]
    assert names[-1] == "command" and plan[-1].offset == 4
    for address in ("bar0", "bar5", "msi address", "msi upper address", "msi data", "msi mask"):
        assert names.index(address) < names.index("msi control") < names.index("command")
    assert names.index("msi data") < names.index("msi-x control")
    msi = {w.what: (w.offset, w.size) for w in plan}
    assert (msi["msi data"], msi["msi mask"], msi["msi-x control"]) == (
        (0x4C, 2),
        (0x50, 4),
        (0x62, 2),
    )


@given(st.binary(max_size=400), st.integers(1, 64))
@example(encode_message(5, Command.DMA_READ, ACCESS.pack(0xFF0, 16)), 7)
@example(encode_message(5, Command.DMA_WRITE, ACCESS.pack(0, 2) + b"ab"), 64)
@example(encode_message(0, Command.DEVICE_GET_REGION_INFO, b"\0" * 40, reply=True), 3)
def test_any_server_bytes_give_replies_requests_or_our_error(stream: bytes, step: int) -> None:
    """A client fed garbage hands out replies and DMA requests or raises ProtocolError;
    a DMA request it hands out is answered or refused with an errno, nothing else."""
    client = ClientConnection(max_msg_size=512)
    for command in (Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_INFO):
        client.send(command, b"")
    memory = GuestMemory(max_count=64)
    memory.allocate(0, 0x1000, flags=DMA_FLAG_READ, shared=False)
    try:
        for at in [*range(0, len(stream), step), len(stream)]:
            client.receive_data(stream[at : at + step])
            while (event := client.next_event()) is not None:
                if isinstance(event, Message):
                    assert event.command in (Command.DMA_READ, Command.DMA_WRITE)
                    try:
                        reply = memory.serve(event)
                    except OSError as exc:
                        assert exc.errno in (errno.EINVAL, errno.EFAULT, errno.EACCES)
                    else:
                        assert len(reply) >= 16
                elif isinstance(event.body, RegionInfo):
                    try:
                        sparse_areas(event.body)
                    except ProtocolError:
                        pass
    except ProtocolError:
        pass
    finally:
        memory.close()


# --------------------------------------------------------------------------- region io fds


def io_fds_reply(index: int, subs: list[tuple[int, int, int, int, int, int]]) -> bytes:
    """(offset, size, fd index, type, flags, datamatch) each."""
    body = b"".join(
        SUB_REGION_IOEVENTFD.pack(offset, size, fd_index, kind, flags, 0, 0, match)
        for offset, size, fd_index, kind, flags, match in subs
    )
    return IO_FDS.pack(IO_FDS.size + len(body), 0, index, len(subs)) + body


def test_region_io_fds_replies_are_read_with_every_index_checked() -> None:
    reply = io_fds_reply(0, [(0x10, 4, 1, 0, 0, 0), (0x14, 4, 0, 0, 1, 7)])
    assert parse_io_fds(0, reply, [30, 31]) == [
        RegionIoFd(0x10, 4, 31, None),
        RegionIoFd(0x14, 4, 30, 7),
    ]
    with pytest.raises(ProtocolError, match="fd index 2 of 2 fds"):
        parse_io_fds(0, io_fds_reply(0, [(0, 4, 2, 0, 0, 0)]), [30, 31])
    with pytest.raises(ProtocolError, match="type 1"):
        parse_io_fds(0, io_fds_reply(0, [(0, 4, 0, 1, 0, 0)]), [30])
    with pytest.raises(ProtocolError, match="reply is for region 3"):
        parse_io_fds(0, io_fds_reply(3, []), [])
    with pytest.raises(ProtocolError, match="for 2 sub-regions"):
        parse_io_fds(0, reply[:-1], [30, 31])
    with pytest.raises(ProtocolError, match="of 8 bytes"):
        parse_io_fds(0, reply[:8], [])
