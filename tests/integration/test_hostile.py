"""Hostile peers: lies on the wire fail the session with our error (or refuse only that
channel), memory stays bounded, and other devices' channels are unaffected until the
session is failed. See RELIABILITY.md."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
import trio

from tests.integration.faults import CONFIG, UUID, Snapshot, connect, idstr, receiver
from vfiomig import SessionReport
from vfiomig._core._events import BUFFER_SIZE
from vfiomig._core._wire import encode_device_header, encode_handshake, encode_packet
from vfiomig.testing import MemorySink, channel_streams, device_packets

STATE = bytes(range(256)) * 40
PACKET = 1000


@pytest.fixture
async def snapshot() -> Snapshot:
    return Snapshot.take()


def good(i: int) -> list[bytes]:
    return device_packets(idstr(i), 0, STATE, CONFIG, PACKET)


def unterminated_idstr() -> bytes:
    raw = bytearray(encode_packet(idstr(0), 0, 3, 0, b"x"))
    raw[12 : 12 + 256] = b"A" * 256
    return bytes(raw)


HOSTILE = {
    "unterminated idstr": (unterminated_idstr(), "channel 1: packet idstr is not nul-terminated"),
    "next_packet_size 4 GiB": (
        encode_device_header(idstr(0), 0, 0xFFFFFFFF) + b"\0" * 12,
        f"{idstr(0)}/0: packet size 4294967295 is above the cap (67108864)",
    ),
    "idx 0xFFFFFFFE": (
        encode_packet(idstr(0), 0, 0xFFFFFFFE, 0, b"x") + encode_packet(idstr(0), 0, 5, 1, CONFIG),
        f"{idstr(0)}/0: config packet idx 5 is below data idx 4294967294",
    ),
    "second config packet": (
        encode_packet(idstr(0), 0, 40, 1, CONFIG) + encode_packet(idstr(0), 0, 41, 1, CONFIG),
        f"{idstr(0)}/0: second config packet idx 41 (first was idx 40)",
    ),
    "data after the config idx": (
        encode_packet(idstr(0), 0, 40, 1, CONFIG) + encode_packet(idstr(0), 0, 42, 0, b"x"),
        f"{idstr(0)}/0: data packet idx 42 is above the config idx 40",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_channel_fails_with_our_error(case: str, snapshot: Snapshot) -> None:
    payload, message = HOSTILE[case]
    victim, bystander = MemorySink(), MemorySink()
    tracemalloc.start()
    try:
        with trio.fail_after(10):
            async with receiver([victim, bystander], channels=2, gate="control") as rx:
                # The bystander's whole stream is in and queued before the liar speaks.
                honest = await connect(rx)
                await honest.send_all(b"".join(channel_streams(good(1), 1, UUID)))
                dev = rx.session.devices[idstr(1), 0]
                while not dev.buf.complete:  # noqa: ASYNC110 - polling a test condition
                    await trio.sleep(0.01)
                assert not rx.session.done.is_set()
                liar = await connect(rx)
                await liar.send_all(encode_handshake(UUID, 1) + payload)
                await rx.session.done.wait()
                await liar.aclose()
                await honest.aclose()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report = rx.failed().report
    errors = [d.error for d in report.devices] + list(report.errors)
    assert message in errors, errors
    # A 4 GiB size never sizes an allocation: the peak is the two channels' receive blocks.
    assert peak < 2 * BUFFER_SIZE + (1 << 20), peak
    assert victim.data == b"" and bystander.data == b""  # gate closed: nothing written
    assert "abort" in victim.calls and "abort" in bystander.calls
    snapshot.check()


async def test_connection_storm_is_refused_and_the_session_carries_on(snapshot: Snapshot) -> None:
    sink = MemorySink()
    with trio.fail_after(20):
        async with receiver([sink], channels=2, handshake_timeout=1.0) as rx:
            storm = []
            for _ in range(100):  # loopback only, bounded
                storm.append(await connect(rx))
            for s in storm[:50]:
                try:  # bad handshakes; an evicted connection was reset already
                    await s.send_all(b"\x11\x22\x33\x44" + b"\0" * 60)
                except trio.BrokenResourceError:
                    pass
            streams = channel_streams(good(0), 2, UUID, seed=2)
            for stream in streams:
                conn = await connect(rx)
                await conn.send_all(stream)
                await conn.aclose()
            await rx.session.done.wait()
            for s in storm:
                await s.aclose()
    report = rx.outcome[0]
    assert isinstance(report, SessionReport), str(report)
    assert bytes(sink.data) == STATE
    assert report.channels_accepted == 2
    snapshot.check()


async def test_handshake_one_byte_per_second_is_dropped(snapshot: Snapshot) -> None:
    sink = MemorySink()
    with trio.fail_after(10):
        async with receiver([sink], channels=1, handshake_timeout=0.5) as rx:
            slow = await connect(rx)
            handshake = encode_handshake(UUID, 0)
            with pytest.raises(trio.BrokenResourceError):
                for b in handshake:  # a second per byte in spirit; 0.2 s is enough here
                    await slow.send_all(bytes([b]))
                    await trio.sleep(0.2)
            await slow.aclose()
            assert rx.session.channels_refused == 1 and rx.session.channels_accepted == 0
            conn = await connect(rx)  # the slot is free for an honest channel
            await conn.send_all(channel_streams(good(0), 1, UUID)[0])
            await conn.aclose()
    assert isinstance(rx.outcome[0], SessionReport), str(rx.outcome[0])
    assert bytes(sink.data) == STATE
    snapshot.check()


def test_hostile_cases_are_well_formed() -> None:
    # The 4 GiB case is exactly the header QEMU would send, size field at offset 272.
    raw = HOSTILE["next_packet_size 4 GiB"][0]
    assert struct.unpack_from(">I", raw, 272) == (0xFFFFFFFF,)
