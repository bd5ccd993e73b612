"""The sans-IO vfio-user codec: byte layouts, round trips, malformed input, property tests."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfiomig._core._errors import PacketError
from vfiomig.vfio_user import BarDevice, _fsm
from vfiomig.vfio_user._header import FLAG_ERROR, FLAG_TYPE_REPLY, Command, ProtocolError
from vfiomig.vfio_user._layouts import (
    RegionInfo,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteReply,
)
from vfiomig.vfio_user._messages import Empty, ErrorReply, Malformed, Opaque
from vfiomig.vfio_user._migration_bodies import (
    DeviceFeature,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigState,
)
from vfiomig.vfio_user._protocol import (
    ClientConnection,
    Header,
    Message,
    ServerConnection,
    encode_message,
)
from vfiomig.vfio_user._version import Capabilities, MigrationCaps, Version
from vfiomig.vfio_user.server._device import VfioUserDevice
from vfiomig.vfio_user.server._handlers import handle
from vfiomig.vfio_user.server._session import Session

HDR = struct.Struct("=HHIII")


def server_receive(data: bytes, *, max_msg_size: int = 1 << 20) -> list[Message]:
    conn = ServerConnection(max_msg_size=max_msg_size)
    conn.receive_data(data)
    out = []
    while (msg := conn.next_request()) is not None:
        out.append(msg)
    return out


# ------------------------------------------------------------------ byte-exact layouts


def test_get_migration_is_byte_exact() -> None:
    wire = encode_message(7, Command.DEVICE_FEATURE, DeviceFeature.get_migration().pack())
    assert wire == HDR.pack(7, 16, 24, 0, 0) + struct.pack("=II", 16, 0x10001)


def test_set_resuming_and_stop_are_byte_exact() -> None:
    resuming = DeviceFeature.set_state(MigState.RESUMING).pack()
    assert resuming == struct.pack("=IIII", 16, 0x20002, 4, 0xFFFFFFFF)
    wire = encode_message(1, Command.DEVICE_FEATURE, DeviceFeature.set_state(MigState.STOP).pack())
    assert wire == HDR.pack(1, 16, 32, 0, 0) + struct.pack("=IIII", 16, 0x20002, 1, 0xFFFFFFFF)


def test_get_state_is_byte_exact() -> None:
    assert DeviceFeature.get_state().pack() == struct.pack("=IIII", 16, 0x10002, 0, 0)


def test_mig_data_write_layout() -> None:
    wire = encode_message(3, Command.MIG_DATA_WRITE, MigDataWrite.of(b"abc").pack())
    assert wire == HDR.pack(3, 18, 16 + 8 + 3, 0, 0) + struct.pack("=II", 11, 3) + b"abc"


def test_error_reply_is_header_only() -> None:
    wire = encode_message(9, Command.MIG_DATA_WRITE, b"", reply=True, error_no=22)
    assert wire == HDR.pack(9, 18, 16, FLAG_TYPE_REPLY | FLAG_ERROR, 22)


def test_version_json_layout() -> None:
    caps = Capabilities(
        max_msg_fds=8,
        max_data_xfer_size=4096,
        pgsizes=4096,
        migration=MigrationCaps(pgsize=4096, max_bitmap_size=256),
    )
    payload = Version(0, 2, caps).pack()
    assert payload[:4] == struct.pack("=HH", 0, 2)
    assert payload.endswith(b"\0")
    assert json.loads(payload[4:-1]) == {
        "capabilities": {
            "max_msg_fds": 8,
            "max_data_xfer_size": 4096,
            "pgsizes": 4096,
            "migration": {"pgsize": 4096, "max_bitmap_size": 256},
        }
    }


def test_version_parses_libvfio_user_reply() -> None:
    raw = b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096},"twin_socket":{"supported":true}}}\0'
    v = Version.unpack(memoryview(struct.pack("=HH", 0, 2) + raw))
    assert v == Version(
        0,
        2,
        Capabilities(
            max_msg_fds=8,
            max_data_xfer_size=1048576,
            pgsizes=None,
            migration=MigrationCaps(pgsize=4096),
        ),
    )


def test_version_without_json_uses_defaults() -> None:
    v = Version.unpack(memoryview(struct.pack("=HH", 0, 0)))
    assert v.capabilities is None
    assert Capabilities(max_data_xfer_size=None).data_xfer_limit == 1024 * 1024


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "not valid json"),
        (b"[1,2]", "json list, not an object"),
        (b'{"capabilities": 3}', "capabilities is a json int"),
        (b'{"capabilities": {"max_data_xfer_size": "big"}}', "max_data_xfer_size is 'big'"),
        (b'{"capabilities": {"max_data_xfer_size": 0}}', "max_data_xfer_size is 0 (min 1"),
        (b'{"capabilities": {"max_msg_fds": true}}', "max_msg_fds is True"),
        (b'{"capabilities": {"migration": 5}}', "migration is a json int"),
        (b"\xff\xfe", "not valid json"),
    ],
)
def test_version_rejects_bad_json(raw: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words.replace("(", r"\(")):
        Version.unpack(memoryview(struct.pack("=HH", 0, 0) + raw + b"\0"))


# ------------------------------------------------------------------ round trips


REQUESTS = [
    (Command.VERSION, Version(0, 0, Capabilities())),
    (Command.DEVICE_FEATURE, DeviceFeature.set_state(MigState.RESUMING)),
    (Command.MIG_DATA_READ, MigDataRead.for_size(4096)),
    (Command.MIG_DATA_WRITE, MigDataWrite.of(b"x" * 100)),
    (Command.REGION_READ, RegionRead(2, 0x10, 8)),
    (Command.REGION_WRITE, RegionWrite(1, 0x20, b"12345678")),
    (Command.DEVICE_GET_REGION_INFO, RegionInfo.request(3)),
    (Command.DEVICE_RESET, Empty()),
    (Command.DMA_MAP, Opaque(b"\1" * 32)),
]

REPLIES = [
    (Command.VERSION, Version(0, 0, Capabilities(max_msg_fds=8))),
    (Command.DEVICE_FEATURE, DeviceFeature(16, 0x10001, struct.pack("=Q", 5))),
    (Command.MIG_DATA_READ, MigDataReadReply.of(b"state")),
    (Command.MIG_DATA_WRITE, Empty()),
    (Command.REGION_READ, RegionReadReply(0, 4, 3, b"abc")),
    (Command.REGION_WRITE, RegionWriteReply(0, 4, 3)),
    (Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 1, flags=3, size=0x3000)),
    (Command.DEVICE_RESET, Empty()),
]


@pytest.mark.parametrize(("command", "body"), REQUESTS)
def test_request_round_trip(command: Command, body: object) -> None:
    wire = encode_message(41, command, body.pack())  # type: ignore[attr-defined]
    (msg,) = server_receive(wire)
    assert msg.header == Header(41, command, len(wire))
    assert msg.body == body


@pytest.mark.parametrize(("command", "body"), REPLIES)
def test_reply_round_trip(command: Command, body: object) -> None:
    client = ClientConnection()
    msg_id, _ = client.send(command, b"")
    client.receive_data(ServerConnection.reply(server_receive(_)[0], body.pack()))  # type: ignore[attr-defined]
    reply = client.next_reply()
    assert reply is not None
    assert (reply.msg_id, reply.command, reply.body) == (msg_id, command, body)
    assert client.pending == 0


def test_error_reply_round_trip_byte_by_byte() -> None:
    client = ClientConnection()
    msg_id, wire = client.send(Command.MIG_DATA_WRITE, MigDataWrite.of(b"z").pack())
    (request,) = server_receive(wire)
    for byte in ServerConnection.error(request, 28):
        assert client.next_reply() is None
        client.receive_data(bytes([byte]))
    reply = client.next_reply()
    assert reply is not None and reply.body == ErrorReply(28) and reply.msg_id == msg_id


def test_mig_data_read_reply_tolerates_libvfio_user_padding() -> None:
    # libvfio-user sizes the reply for the requested size and sets size to what it read.
    payload = struct.pack("=II", 8 + 3, 3) + b"abc" + bytes(13)
    assert MigDataReadReply.unpack(memoryview(payload)) == MigDataReadReply(11, 3, b"abc")


def test_pipelined_replies_match_in_any_order() -> None:
    client = ClientConnection()
    ids = [client.send(Command.MIG_DATA_WRITE, MigDataWrite.of(b"a").pack())[0] for _ in range(3)]
    replies = b"".join(
        encode_message(i, Command.MIG_DATA_WRITE, b"", reply=True) for i in reversed(ids)
    )
    client.receive_data(replies)
    got = [r.msg_id for r in iter(client.next_reply, None)]
    assert got == list(reversed(ids))
    assert client.pending == 0


def test_msg_ids_skip_outstanding_ones() -> None:
    client = ClientConnection()
    first, _ = client.send(Command.DEVICE_RESET, b"")
    client._next_id = first  # wrap around onto the outstanding id
    second, _ = client.send(Command.DEVICE_RESET, b"")
    assert second != first


# ------------------------------------------------------------------ malformed input


@pytest.mark.parametrize(
    ("command", "payload", "words"),
    [
        (
            Command.DEVICE_FEATURE,
            b"\0" * 7,
            "device feature payload of 7 bytes is too short (min 8)",
        ),
        (Command.MIG_DATA_WRITE, struct.pack("=II", 20, 12) + b"x" * 11, "size 12 exceeds the 11"),
        (Command.MIG_DATA_READ, b"\0" * 4, "mig data read payload of 4 bytes"),
        (
            Command.REGION_WRITE,
            struct.pack("=QII", 0, 0, 5) + b"abcd",
            "count 5 differs from its 4",
        ),
        (Command.REGION_READ, b"\0" * 15, "region read payload of 15 bytes"),
        (Command.DEVICE_GET_REGION_INFO, b"\0" * 31, "region info payload of 31 bytes"),
        (Command.VERSION, b"\0", "version payload of 1 bytes is too short (min 4)"),
    ],
)
def test_malformed_request_bodies(command: Command, payload: bytes, words: str) -> None:
    (msg,) = server_receive(encode_message(1, command, payload))
    assert isinstance(msg.body, Malformed)
    assert words in msg.body.reason


def test_size_below_header_is_fatal_and_poisons() -> None:
    conn = ServerConnection()
    conn.receive_data(HDR.pack(1, 18, 15, 0, 0))
    with pytest.raises(ProtocolError, match="message size 15 is below the header size 16"):
        conn.next_request()
    with pytest.raises(ProtocolError, match="unusable"):
        conn.next_request()
    with pytest.raises(ProtocolError, match="unusable"):
        conn.receive_data(b"more")


def test_oversized_message_is_skipped_without_buffering() -> None:
    conn = ServerConnection(max_msg_size=64)
    big = encode_message(5, Command.MIG_DATA_WRITE, MigDataWrite.of(b"x" * 1000).pack())
    small = encode_message(6, Command.DEVICE_RESET, b"")
    conn.receive_data(big[:100])
    assert conn.next_request() is None
    assert conn._framer.buffered == 0  # the oversized payload is dropped as it arrives
    conn.receive_data(big[100:] + small)
    first = conn.next_request()
    assert first is not None and first.msg_id == 5
    assert first.body == Malformed("MIG_DATA_WRITE message size 1024 exceeds the limit 64")
    second = conn.next_request()
    assert second is not None and second.msg_id == 6 and second.body == Empty()


def test_eof_inside_a_message() -> None:
    conn = ServerConnection()
    conn.receive_data(encode_message(1, Command.DEVICE_RESET, b"")[:10])
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed inside a message with 10 bytes"):
        conn.next_request()


def test_clean_eof() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    assert conn.next_request() is None and conn.closed


def test_server_refuses_replies() -> None:
    conn = ServerConnection()
    conn.receive_data(encode_message(1, Command.VERSION, b"\0" * 4, reply=True))
    with pytest.raises(ProtocolError, match="client sent a VERSION reply"):
        conn.next_request()


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (encode_message(0, Command.DEVICE_RESET, b""), "not a reply"),
        (
            encode_message(9, Command.DEVICE_RESET, b"", reply=True),
            "msg_id 9, which is not outstanding",
        ),
        (encode_message(0, Command.VERSION, b"\0" * 4, reply=True), "expected DEVICE_RESET"),
        (
            encode_message(0, Command.DEVICE_RESET, b"", reply=True)[:8],
            "server closed the connection with 1 replies outstanding",
        ),
    ],
)
def test_client_rejects_bad_replies(wire: bytes, words: str) -> None:
    client = ClientConnection()
    client.send(Command.DEVICE_RESET, b"")
    client.receive_data(wire)
    if len(wire) < 16:
        assert client.next_reply() is None
        client.receive_data(b"")
        words = "closed inside a message"
    with pytest.raises(ProtocolError, match=words):
        client.next_reply()
    with pytest.raises(ProtocolError, match="unusable"):
        client.next_reply()


def test_client_rejects_malformed_reply() -> None:
    client = ClientConnection()
    client.send(Command.MIG_DATA_READ, MigDataRead.for_size(4).pack())
    client.receive_data(
        encode_message(0, Command.MIG_DATA_READ, struct.pack("=II", 20, 12), reply=True)
    )
    with pytest.raises(
        ProtocolError, match=r"malformed MIG_DATA_READ reply: .*size 12 exceeds the 0"
    ):
        client.next_reply()


def test_client_eof_with_replies_outstanding() -> None:
    client = ClientConnection()
    client.send(Command.DEVICE_RESET, b"")
    client.receive_data(b"")
    with pytest.raises(ProtocolError, match="1 replies outstanding"):
        client.next_reply()


# ------------------------------------------------------------------ property tests


def chopped(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


message_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda mid, cmd, flags, err, payload, fudge: (
            HDR.pack(mid, cmd, max(0, min(0xFFFFFFFF, 16 + len(payload) + fudge)), flags, err)
            + payload
        ),
        st.integers(0, 0xFFFF),
        st.integers(0, 20),
        st.sampled_from([0, 1, 0x10, 0x21, 0xFFFFFFFF]),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=80),
        st.integers(-20, 20),
    ),
)


@given(
    st.lists(message_bytes, max_size=6), st.lists(st.integers(0, 2000), max_size=8), st.booleans()
)
def test_server_garbage_parses_or_raises_our_error(
    parts: list[bytes], cuts: list[int], eof: bool
) -> None:
    """Any bytes: requests come out, and the device answers each (a reply or an errno)."""
    device = VfioUserDevice(BarDevice([64, 8]), max_data_xfer_size=64)
    conn = ServerConnection(max_msg_size=device.max_msg_size)
    session = Session(negotiated=True)
    data = b"".join(parts)
    try:
        for piece in [*chopped(data, cuts), *([b""] if eof else [])]:
            conn.receive_data(piece)
            while (msg := conn.next_request()) is not None:
                payload = (
                    memoryview(msg.body.pack()) if hasattr(msg.body, "pack") else memoryview(b"")
                )
                try:
                    reply = handle(device, session, msg.command, payload, [])
                except OSError as exc:
                    assert exc.errno is not None and exc.errno > 0
                else:
                    assert all(isinstance(p, bytes | bytearray | memoryview) for p in reply.parts)
    except PacketError as exc:
        assert isinstance(exc, ProtocolError)


@given(st.lists(message_bytes, max_size=6), st.lists(st.integers(0, 2000), max_size=8))
def test_client_garbage_parses_or_raises_our_error(parts: list[bytes], cuts: list[int]) -> None:
    client = ClientConnection(max_msg_size=128)
    for command in (Command.DEVICE_FEATURE, Command.MIG_DATA_READ, Command.VERSION):
        client.send(command, b"")
    try:
        for piece in [*chopped(b"".join(parts), cuts), b""]:
            client.receive_data(piece)
            while client.next_reply() is not None:
                pass
    except ProtocolError:
        pass


@given(st.binary(max_size=200))
def test_every_body_decoder_parses_or_raises_our_error(payload: bytes) -> None:
    for command in Command:
        for reply in (False, True):
            wire = encode_message(1, command, payload, reply=reply)
            conn = ClientConnection()
            if reply:
                conn.send(command, b"")
                conn.receive_data(wire)
                try:
                    conn.next_reply()
                except ProtocolError:
                    pass
            else:
                (msg,) = server_receive(wire)
                assert msg.command == command


# ------------------------------------------------------------------ migration FSM


@pytest.mark.parametrize(
    ("start", "target", "steps"),
    [
        (MigState.RUNNING, MigState.RESUMING, [MigState.STOP, MigState.RESUMING]),
        (MigState.RUNNING, MigState.STOP_COPY, [MigState.STOP, MigState.STOP_COPY]),
        (MigState.RESUMING, MigState.RUNNING, [MigState.STOP, MigState.RUNNING]),
        (
            MigState.PRE_COPY,
            MigState.RESUMING,
            [MigState.RUNNING, MigState.STOP, MigState.RESUMING],
        ),
        (MigState.STOP_COPY, MigState.STOP_COPY, []),
        (MigState.STOP_COPY, MigState.PRE_COPY, None),
        (MigState.RUNNING, MigState.ERROR, None),
        (MigState.ERROR, MigState.RUNNING, None),
        (MigState.RUNNING, MigState.RUNNING_P2P, None),
    ],
)
def test_fsm_paths(start: MigState, target: MigState, steps: list[MigState] | None) -> None:
    assert _fsm.path(start, target) == steps


def test_fsm_paths_use_direct_arcs_only() -> None:
    for start in MigState:
        for target in MigState:
            steps = _fsm.path(start, target)
            if steps is None:
                continue
            here = start
            for step in steps:
                assert step in _fsm.DIRECT_ARCS[here]
                here = step
