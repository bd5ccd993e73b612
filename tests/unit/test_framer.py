from __future__ import annotations

import random
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfiomig._core._wire import encode_handshake, encode_packet, encode_ram_packet, wrap_config
from vfiomig.testing import device_packets

UUID = bytes(range(16))


def events(core: types.ModuleType, stream: bytes, sizes: list[int], **kw: object) -> list[object]:
    """Feed ``stream`` in slices of ``sizes`` (cycled), reading data whole; return events."""
    f = core.Framer(uuid=UUID, channels=4, **kw)
    out: list[object] = []
    pos = 0
    k = 0
    while True:
        ev = f.next_event()
        if ev is core.NEED_DATA:
            n = sizes[k % len(sizes)]
            k += 1
            f.feed(stream[pos : pos + n])
            pos += n
            continue
        out.append(ev)
        if isinstance(ev, core.PacketHeader) and ev.size:
            buf = bytearray(ev.size)
            got = 0
            while got < ev.size:
                got += f.read_payload_into(memoryview(buf)[got:])
                if got < ev.size:
                    n = sizes[k % len(sizes)]
                    k += 1
                    f.feed(stream[pos : pos + n])
                    pos += n
            out.append(bytes(buf))
        if isinstance(ev, core.ChannelEnd):
            return out


def test_handshake_then_packets_then_end(core: types.ModuleType) -> None:
    stream = encode_handshake(UUID, 2) + encode_packet("dev", 1, 0, 0, b"hello")
    evs = events(core, stream, [1 << 20])
    assert evs == [
        core.ChannelHello(2),
        core.PacketHeader("dev", 1, 0, 0, 0, 5),
        b"hello",
        core.ChannelEnd(),
    ]


@given(st.lists(st.integers(1, 700), min_size=1, max_size=20), st.integers(0, 2**32 - 1))
def test_any_slicing_gives_the_same_events(sizes: list[int], seed: int) -> None:
    import vfiomig._core as core

    rng = random.Random(seed)
    state = rng.randbytes(rng.randint(0, 5000))
    stream = encode_handshake(UUID, 0) + b"".join(
        device_packets("a/vfio", 0, state, wrap_config(b"c"), rng.randint(1, 900))
    )
    whole = events(core, stream, [1 << 30])
    assert events(core, stream, sizes) == whole
    assert events(core, stream, [1]) == whole


def test_ram_and_sync_packets_are_skipped_with_a_page_count(core: types.ModuleType) -> None:
    stream = (
        encode_handshake(UUID, 0)
        + encode_ram_packet(128, b"x" * 4096)
        + encode_ram_packet(128, b"", flags=1)
        + encode_packet("dev", 0, 0, 0, b"ab")
    )
    evs = events(core, stream, [7], ram_page_count=128)
    assert evs[1] == core.RamSkipped(0, 4096)
    assert evs[2] == core.RamSkipped(1, 0)
    assert evs[3] == core.PacketHeader("dev", 0, 0, 0, 0, 2)


def test_ram_packet_without_page_count_is_an_error(core: types.ModuleType) -> None:
    stream = encode_handshake(UUID, 1) + encode_ram_packet(128, b"x")
    with pytest.raises(core.PacketError, match=r"channel 1: ram packet with flags 0x0"):
        events(core, stream, [1000])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: b"\x11\x22\x33\x00" + p[4:], "channel 0: packet magic 0x11223300"),
        (lambda p: p[:4] + b"\0\0\0\7" + p[8:], "channel 0: packet version 7"),
        (lambda p: p[:267] + b"X" + p[268:], "channel 0: packet idstr is not nul-terminated"),
        (
            lambda p: p[:272] + (11).to_bytes(4, "big") + p[276:],
            r"dev/0: packet too short at 11 \(min is 12\)",
        ),
        (
            lambda p: p[:272] + (2**32 - 1).to_bytes(4, "big") + p[276:],
            r"dev/0: packet size 4294967295 is above the cap \(67108864\)",
        ),
    ],
)
def test_malformed_headers(core: types.ModuleType, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    packet = encode_packet("dev", 0, 0, 0, b"abcdef")
    stream = encode_handshake(UUID, 0) + mutate(packet)
    with pytest.raises(core.PacketError, match=message):
        events(core, stream, [100])


def test_error_poisons_the_framer(core: types.ModuleType) -> None:
    f = core.Framer(uuid=UUID, channels=1)
    f.feed(encode_handshake(UUID, 0) + b"\0" * 12)
    f.next_event()
    with pytest.raises(core.PacketError) as first:
        f.next_event()
    with pytest.raises(core.PacketError) as again:
        f.next_event()
    assert again.value is first.value


@pytest.mark.parametrize("cut", [10, 64 + 5, 64 + 276 + 3, 64 + 276 + 12 + 2])
def test_eof_inside_a_packet(core: types.ModuleType, cut: int) -> None:
    stream = (encode_handshake(UUID, 0) + encode_packet("dev", 0, 4, 0, b"abcdef"))[:cut]
    with pytest.raises(core.StreamIncompleteError, match="ended inside"):
        events(core, stream, [1000])


def test_eof_inside_data_names_device_and_idx(core: types.ModuleType) -> None:
    stream = (encode_handshake(UUID, 0) + encode_packet("dev", 0, 4, 0, b"abcdef"))[:-2]
    with pytest.raises(
        core.StreamIncompleteError,
        match=r"dev/0: channel ended inside packet idx 4 \(4 of 6 bytes\)",
    ):
        events(core, stream, [1000])


def test_zero_copy_path(core: types.ModuleType) -> None:
    """get_buffer/commit and consume_external give the same packets as feed()."""
    data = bytes(range(256)) * 40
    stream = encode_handshake(UUID, 0) + encode_packet("dev", 0, 0, 0, data)
    f = core.Framer(uuid=UUID, channels=1)
    view = f.get_buffer(64 + 276 + 12 + 100)
    view[: 64 + 276 + 12 + 100] = stream[: 64 + 276 + 12 + 100]
    del view
    f.commit(64 + 276 + 12 + 100)
    assert f.next_event() == core.ChannelHello(0)
    header = f.next_event()
    assert header.size == len(data)
    out = bytearray(len(data))
    got = f.read_payload_into(memoryview(out))
    assert got == 100 and f.buffered == 0
    out[got:] = data[got:]  # as if recv_into'd straight from the socket
    f.consume_external(len(data) - got)
    assert bytes(out) == data
    f.feed(b"")
    assert f.next_event() == core.ChannelEnd()


@given(st.binary(max_size=2000), st.integers(1, 300))
def test_garbage_parses_or_raises_our_error(garbage: bytes, step: int) -> None:
    import vfiomig._core as core

    for prefix in (b"", encode_handshake(UUID, 0)):
        f = core.Framer(uuid=UUID, channels=1, packet_cap=1 << 16, ram_page_count=4)
        stream = prefix + garbage
        pos = 0
        try:
            while True:
                ev = f.next_event()
                if ev is core.NEED_DATA:
                    f.feed(stream[pos : pos + step])
                    pos += step
                elif isinstance(ev, core.PacketHeader) and ev.size:
                    buf = bytearray(ev.size)
                    got = 0
                    while got < ev.size:
                        got += f.read_payload_into(memoryview(buf)[got:])
                        if got < ev.size:
                            f.feed(stream[pos : pos + step])
                            pos += step
                elif isinstance(ev, core.ChannelEnd):
                    break
        except core.VfioMigError:
            pass
