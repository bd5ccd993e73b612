"""The sender's outboxes, packet headers and buffers, both cores: same bytes, same errors."""

from __future__ import annotations

import random
import socket
import types

import pytest

import vfiomig._core as core_module
from vfiomig._core._wire import encode_device_header, encode_vfio_header

IDSTR = "0000:00:04.0/vfio"


def expected(idx: int, flags: int, data: bytes, endian: str = "be", instance: int = 3) -> bytes:
    return (
        encode_device_header(IDSTR, instance, 12 + len(data))
        + encode_vfio_header(idx, flags, endian=endian)  # type: ignore[arg-type]
        + data
    )


def drain(outbox: object, rng: random.Random) -> bytes:
    """Write an outbox out in random pieces through views/advance."""
    out = bytearray()
    while outbox.queued_packets:  # type: ignore[attr-defined]
        views = outbox.views(rng.choice([-1, 1, 2]))  # type: ignore[attr-defined]
        flat = b"".join(bytes(v) for v in views)
        n = rng.randint(1, len(flat))
        out += flat[:n]
        outbox.advance(n)  # type: ignore[attr-defined]
    return bytes(out)


@pytest.mark.parametrize("endian", ["be", "host"])
def test_put_and_spread_give_the_packets_bytes(core: types.ModuleType, endian: str) -> None:
    rng = random.Random(1)
    headers = core.PacketHeaders(IDSTR, 3, endian)
    boxes = [core.Outbox(), core.Outbox()]
    buf = core.SendBuffer(10_000)
    payload = rng.randbytes(10_000)
    memoryview(buf)[:] = payload
    assert headers.spread(buf, 9_500, 3000, 7, boxes, b"\x01\x00\x01\x00") == 4
    assert buf.busy and buf.pins == 4
    assert headers.put(boxes[0], b"config", 11, 1) == 288 + 6
    want0 = expected(8, 0, payload[3000:6000], endian) + expected(10, 0, payload[9000:9500], endian)
    want0 += expected(11, 1, b"config", endian)
    want1 = expected(7, 0, payload[:3000], endian) + expected(9, 0, payload[6000:9000], endian)
    assert boxes[0].queued_bytes == len(want0) and boxes[0].queued_packets == 3
    assert drain(boxes[0], rng) == want0
    assert buf.busy
    assert drain(boxes[1], rng) == want1
    assert not buf.busy and buf.pins == 0
    assert boxes[1].sent_packets == 2 and boxes[1].sent_bytes == len(want1)
    assert headers.header(5, 1, 100) == expected(5, 1, b"x" * 100, endian)[:288]


def test_take_and_clear_release_the_buffers(core: types.ModuleType) -> None:
    headers = core.PacketHeaders(IDSTR, 3)
    box = core.Outbox()
    buf = core.SendBuffer(4096)
    memoryview(buf)[:] = bytes(range(256)) * 16
    headers.spread(buf, 4096, 1024, 0, [box], bytes(4))
    box.advance(100)  # part of the first header went out
    assert box.head_size == 288 + 1024 - 100
    first = box.take(1)  # the rest of one packet
    assert first == expected(0, 0, bytes(memoryview(buf)[:1024]))[100:]
    assert box.take(2000) == expected(1, 0, bytes(memoryview(buf)[1024:2048])) + expected(
        2, 0, bytes(memoryview(buf)[2048:3072])
    )
    assert buf.pins == 1
    box.clear()
    assert not buf.busy and box.queued_packets == 0 and box.queued_bytes == 0


def test_views_stop_at_iov_max(core: types.ModuleType) -> None:
    headers = core.PacketHeaders(IDSTR, 0)
    box = core.Outbox()
    buf = core.SendBuffer(1000)
    headers.spread(buf, 1000, 1, 0, [box], bytes(1000))
    assert len(box.views()) == core.IOV_MAX
    assert len(box.views(3)) == 6


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.PacketHeaders("x" * 256, 0), "idstr 'xxxx"),
        (lambda c: c.PacketHeaders(IDSTR, 1 << 32), "instance 4294967296 is out of range"),
        (lambda c: c.Outbox().advance(1), "advance 1 is out of range (queued 0)"),
        (
            lambda c: c.PacketHeaders(IDSTR, 0).spread(
                c.SendBuffer(10), 11, 5, 0, [c.Outbox()], b""
            ),
            "spread of 11 bytes in packets of 5 is invalid",
        ),
        (
            lambda c: c.PacketHeaders(IDSTR, 0).spread(
                c.SendBuffer(10), 10, 3, 0, [c.Outbox()], b""
            ),
            "spread needs 4 choices, got 0",
        ),
        (
            lambda c: c.PacketHeaders(IDSTR, 0).spread(
                c.SendBuffer(10), 10, 5, 0, [c.Outbox()], b"\x00\x01"
            ),
            "choice 1 is out of range (1 outboxes)",
        ),
        (lambda c: c.SendBuffer(-1), "negative size"),
    ],
)
def test_errors_read_the_same(core: types.ModuleType, call: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call(core)  # type: ignore[operator]
    assert str(info.value).startswith(message)
    other = core_module.IMPLEMENTATIONS["python"]
    with pytest.raises(ValueError) as ref:
        call(other)  # type: ignore[operator]
    assert str(info.value) == str(ref.value)


def test_a_bad_spread_queues_nothing(core: types.ModuleType) -> None:
    box = core.Outbox()
    buf = core.SendBuffer(10)
    with pytest.raises(ValueError):
        core.PacketHeaders(IDSTR, 0).spread(buf, 10, 5, 0, [box], b"\x00\x07")
    assert box.queued_packets == 0 and not buf.busy


def test_native_send_writes_until_the_socket_is_full() -> None:
    if "native" not in core_module.IMPLEMENTATIONS:
        pytest.skip("the C core is not built")
    core = core_module.IMPLEMENTATIONS["native"]
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        headers = core.PacketHeaders(IDSTR, 3)
        box = core.Outbox()
        buf = core.SendBuffer(1 << 20)
        payload = random.Random(2).randbytes(1 << 20)
        memoryview(buf)[:] = payload
        headers.spread(buf, 1 << 20, 4096, 0, [box], bytes(256))
        want = b"".join(expected(i, 0, payload[i * 4096 : (i + 1) * 4096]) for i in range(256))
        got = bytearray()
        first = box.send(a.fileno())
        assert 0 < first < len(want)  # stopped where the socket would block
        assert box.queued_bytes == len(want) - first
        while box.queued_packets:
            got += b.recv(1 << 20)
            box.send(a.fileno(), 1)  # at most the head packet
        while len(got) < len(want):
            got += b.recv(1 << 20)
        assert bytes(got) == want and not buf.busy
        b.close()
        headers.put(box, b"late", 256)
        with pytest.raises(OSError) as info:
            box.send(a.fileno())
        assert info.value.errno is not None


def test_fits_counts_the_whole_packets_within_a_budget(core: types.ModuleType) -> None:
    """A paced channel's burst: the packets from the head that fit in the bytes its link
    model lets out now; the head's part already written does not count again."""
    headers = core.PacketHeaders(IDSTR, 3, "be")
    box = core.Outbox()
    for idx, size in enumerate((100, 200, 300)):
        headers.put(box, b"x" * size, idx)
    sizes = [288 + 100, 288 + 200, 288 + 300]
    assert box.fits(0) == (0, 0)
    assert box.fits(sizes[0] - 1) == (0, 0)
    assert box.fits(sizes[0]) == (1, sizes[0])
    assert box.fits(sizes[0] + sizes[1] + sizes[2] - 1) == (2, sizes[0] + sizes[1])
    assert box.fits(10**12) == (3, sum(sizes))
    box.advance(50)  # the head partly written
    assert box.fits(sizes[0] - 50) == (1, sizes[0] - 50)
    assert box.fits(sizes[0] - 51) == (0, 0)
    box.clear()
    assert box.fits(10**12) == (0, 0)
