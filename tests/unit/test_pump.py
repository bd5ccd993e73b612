"""`Framer.pump`: many packets per call, routed into reorder buffers, on both cores.

The slow path of these drivers is what `vfiomig.receive._channels` does with a status other than
NEED_DATA/END, so any slicing, budget and route set must give the per-packet result.
"""

from __future__ import annotations

import random
import types
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiomig._core._framer import Framer
from vfiomig._core._wire import encode_handshake, encode_packet, encode_ram_packet, wrap_config
from vfiomig.testing import device_packets

UUID = bytes(range(16))
DEVICES = [("0000:00:04.0/vfio", 0), ("0000:00:05.0/vfio", 1)]


def _drain(bufs: dict[tuple[str, int], object], out: dict[tuple[str, int], bytearray]) -> None:
    for key, b in bufs.items():
        while (r := b.take_ready()) is not None:  # type: ignore[attr-defined]
            for c in r.chunks:
                out[key] += c
            b.written(r.nbytes)  # type: ignore[attr-defined]


Bufs = dict[tuple[str, int], Any]


def _channel(
    core: types.ModuleType, budget: int
) -> tuple[Any, Bufs, dict[tuple[str, int], bytearray]]:
    """A framer, the devices' open reorder buffers on one budget, and their written data."""
    bud = core.Budget(budget)
    bufs = {k: core.ReorderBuffer(f"{k[0]}/{k[1]}", bud) for k in DEVICES}
    for b in bufs.values():
        b.open_gate()
    out = {k: bytearray() for k in DEVICES}
    return core.Framer(uuid=UUID, channels=4, ram_page_count=2), bufs, out


def _take_slow(
    f: Any, hdr: Any, bufs: Bufs, out: dict[tuple[str, int], bytearray], more: Any, *, offer: bool
) -> Any:
    """The channel's slow path for one packet: offer it (the loader drains while the reader
    is parked), read its data, receiving ``more`` as needed, and deliver it."""
    buf = bufs[hdr.idstr, hdr.instance]
    if offer:
        while not buf.offer(hdr.version, hdr.idx, hdr.flags, hdr.size):
            _drain(bufs, out)
    data = bytearray(hdr.size)
    got = 0
    while got < hdr.size:
        got += f.read_payload_into(memoryview(data)[got:])
        if got < hdr.size:
            more()
    buf.deliver(hdr.idx, bytes(data))
    return buf


def run_pump(
    core: types.ModuleType, stream: bytes, *, seed: int, budget: int, max_slice: int
) -> tuple[dict[tuple[str, int], bytearray], dict[tuple[str, int], bytes | None], int, int]:
    """Feed one channel through pump(); return written data, configs, packets, slow ones."""
    rng = random.Random(seed)
    f, bufs, out = _channel(core, budget)
    pos = 0

    def feed() -> None:
        nonlocal pos
        n = rng.randint(1, max_slice)
        f.feed(stream[pos : pos + n])
        pos += n

    while f.next_event() is core.NEED_DATA:
        feed()
    routes: dict[tuple[str, int], object] = {}
    packets = slow = 0
    while True:
        status, done, hdr = f.pump(routes)
        packets += done
        if status == core.PUMP_NEED_DATA:
            feed()
            continue
        if status == core.PUMP_END:
            break
        slow += 1
        assert status in (core.PUMP_HEADER, core.PUMP_ACCEPTED)
        buf = _take_slow(f, hdr, bufs, out, feed, offer=status == core.PUMP_HEADER)
        packets += 1
        if rng.random() < 0.7:
            routes[hdr.idstr, hdr.instance] = buf  # joins the fast path after its first packet
        _drain(bufs, out)
    _drain(bufs, out)
    return out, {k: b.config for k, b in bufs.items()}, packets, slow


def _stream(seed: int, packet_size: int) -> tuple[bytes, dict[tuple[str, int], bytes], int]:
    """Both devices' packets merged at random, each device's in idx order (as a sender
    queues them, so a refused offer always ends once the loader drains), and a RAM packet."""
    rng = random.Random(seed)
    want = {}
    queues: list[list[bytes]] = []
    for k in DEVICES:
        state = rng.randbytes(rng.randint(0, 6 * packet_size))
        want[k] = state
        cfg = wrap_config(b"cfg" + k[0].encode())
        queues.append(device_packets(k[0], k[1], state, cfg, packet_size))
    packets: list[bytes] = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        packets.append(q.pop(0))
    packets.insert(rng.randrange(len(packets) + 1), encode_ram_packet(2, b"r" * 40))
    return encode_handshake(UUID, 0) + b"".join(packets), want, len(packets)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    packet_size=st.sampled_from([1, 7, 300, 4096]),
    budget=st.sampled_from([0, 5000, 1 << 30]),
    max_slice=st.sampled_from([1, 97, 4096, 1 << 20]),
)
def test_pump_matches_the_stream_for_any_slicing_and_budget(
    core: types.ModuleType, seed: int, packet_size: int, budget: int, max_slice: int
) -> None:
    stream, want, npackets = _stream(seed, packet_size)
    out, configs, packets, slow = run_pump(
        core, stream, seed=seed, budget=budget, max_slice=max_slice
    )
    assert {k: bytes(v) for k, v in out.items()} == want
    assert configs == {k: wrap_config(b"cfg" + k[0].encode()) for k in DEVICES}
    assert packets == npackets and slow <= npackets


def test_pump_results_are_identical_across_cores() -> None:
    import vfiomig._core as core_module

    stream, _, _ = _stream(7, 300)
    results = [
        run_pump(ns, stream, seed=3, budget=2000, max_slice=700)
        for ns in core_module.IMPLEMENTATIONS.values()
    ]
    assert all(r == results[0] for r in results)


def _hello(core: types.ModuleType, rest: bytes) -> Framer:
    f: Framer = core.Framer(uuid=UUID, channels=4)
    f.feed(encode_handshake(UUID, 1) + rest)
    assert isinstance(f.next_event(), core.ChannelHello)
    return f


def test_pump_errors_are_the_references(core: types.ModuleType) -> None:
    name = "0000:00:04.0/vfio/0"
    key = DEVICES[0]
    buf = core.ReorderBuffer(name, core.Budget(1 << 20))
    dup = encode_packet(key[0], key[1], 0, 0, b"ab")
    f = _hello(core, dup + dup)
    with pytest.raises(core.PacketError, match=rf"^{name}: packet idx 0 already received$") as e:
        f.pump({key: buf})
    assert (e.value.device, e.value.idx) == (name, 0)
    with pytest.raises(core.PacketError, match="already received"):
        buf.offer(0, 1, 0, 1)  # poisoned
    f = _hello(core, b"\x00" * 300)
    with pytest.raises(core.PacketError, match=r"^channel 1: packet magic 0x0 \(expected"):
        f.pump({})
    with pytest.raises(core.PacketError, match="magic"):
        f.pump({})  # the framer stays poisoned
    bad_cfg = encode_packet(key[0], key[1], 0, 1, b"not a config blob")
    f = _hello(core, bad_cfg)
    with pytest.raises(
        core.ConfigStateError,
        match=rf"^{name}: config packet idx 0 starts with 0x6e6f74206120636f ",
    ):
        f.pump({key: core.ReorderBuffer(name, core.Budget(1 << 20))})


def test_pump_statuses(core: types.ModuleType) -> None:
    key = DEVICES[0]
    buf = core.ReorderBuffer("d/0", core.Budget(0))
    buf.open_gate()
    pkts = [encode_packet(key[0], key[1], i, 0, b"x" * 10) for i in range(3)]
    f = _hello(core, pkts[0] + pkts[2] + pkts[1][:-3])
    assert f.pump({}) == (core.PUMP_HEADER, 0, core.PacketHeader(key[0], 0, 0, 0, 0, 10))
    with pytest.raises(RuntimeError):
        f.pump({key: buf})  # the caller must take the packet the pump handed over first
    assert f.take_payload() == b"x" * 10
    f = _hello(core, pkts[0] + pkts[2] + pkts[1][:-3])
    # idx 0 is next: accepted despite a zero budget; idx 2 is refused for budget.
    status, done, hdr = f.pump({key: buf})
    assert hdr is not None and (status, done, hdr.idx) == (core.PUMP_HEADER, 1, 2)
    f.take_payload()
    ready = buf.take_ready()
    buf.written(ready.nbytes)  # idx 1 is over budget: accepted only once the loader is idle
    f2 = _hello(core, pkts[1][:-3])
    status, done, hdr = f2.pump({key: buf})
    assert hdr is not None
    assert (status, done, hdr.idx, f2.buffered) == (core.PUMP_ACCEPTED, 0, 1, 7)
    f3 = _hello(core, b"")
    f3.feed(b"")
    assert f3.pump({}) == (core.PUMP_END, 0, None)
    with pytest.raises(RuntimeError, match="before the handshake"):
        core.Framer(uuid=UUID, channels=4).pump({})


@pytest.mark.native
def test_native_pump_takes_native_buffers_only() -> None:
    import vfiomig._core as core_module

    if "native" not in core_module.IMPLEMENTATIONS:
        pytest.skip("no native core")
    native = core_module.IMPLEMENTATIONS["native"]
    py = core_module.IMPLEMENTATIONS["python"]
    key = DEVICES[0]
    f = _hello(native, encode_packet(key[0], key[1], 0, 0, b"x"))
    with pytest.raises(TypeError):
        f.pump({key: py.ReorderBuffer("d/0", py.Budget(10))})
    with pytest.raises(TypeError):
        native.ReorderBuffer("d/0", py.Budget(10))


# -- pump_recv: the framer receives for itself ---------------------------------------


class ScriptedRecv:
    """A non-blocking ``recv_into`` over ``stream``: random lengths, random would-blocks."""

    def __init__(self, stream: bytes, seed: int, max_slice: int, *, error: OSError | None = None):
        self.stream = stream
        self.pos = 0
        self.rng = random.Random(seed)
        self.max_slice = max_slice
        self.error = error  # raised instead of the end of the stream

    def __call__(self, view: memoryview) -> int:
        if self.rng.random() < 0.2:
            raise BlockingIOError
        if self.pos == len(self.stream) and self.error is not None:
            raise self.error
        n = min(len(view), self.rng.randint(1, self.max_slice), len(self.stream) - self.pos)
        view[:n] = self.stream[self.pos : self.pos + n]
        self.pos += n
        return n


def run_pump_recv(
    core: types.ModuleType, stream: bytes, *, seed: int, budget: int, max_slice: int, limit: int
) -> tuple[dict[tuple[str, int], bytearray], int, list[int]]:
    """One channel through pump_recv(), the slow path as `vfiomig.receive._channels` takes it."""
    rng = random.Random(seed)
    recv = ScriptedRecv(stream, seed, max_slice)
    f, bufs, out = _channel(core, budget)

    def fill() -> None:
        while True:
            view = f.get_buffer(rng.randint(1, 5000))
            try:
                n = recv(view)
            except BlockingIOError:
                continue
            finally:
                view.release()
            f.commit(n)
            return

    while f.next_event() is core.NEED_DATA:
        fill()
    routes: dict[tuple[str, int], object] = {}
    packets = 0
    statuses: list[int] = []
    while True:
        status, done, hdr = f.pump_recv(recv, routes, limit)
        statuses.append(status)
        packets += done
        if status in (core.PUMP_NEED_DATA, core.PUMP_WOULD_BLOCK):
            _drain(bufs, out)  # the loader runs while the channel waits
            continue
        if status == core.PUMP_END:
            break
        assert status == core.PUMP_HEADER
        if not hdr.size or rng.random() < 0.5:  # read here, or left to the pump
            routes[hdr.idstr, hdr.instance] = _take_slow(f, hdr, bufs, out, fill, offer=True)
            packets += 1
            continue
        buf = bufs[hdr.idstr, hdr.instance]
        while not buf.offer(hdr.version, hdr.idx, hdr.flags, hdr.size):
            _drain(bufs, out)
        f.defer_payload(buf)
        with pytest.raises(AssertionError, match="one at a time"):
            f.defer_payload(buf)
        routes[hdr.idstr, hdr.instance] = buf
    _drain(bufs, out)
    return out, packets, statuses


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    packet_size=st.sampled_from([1, 300, 4096, 300_000]),
    budget=st.sampled_from([0, 5000, 1 << 30]),
    max_slice=st.sampled_from([1, 97, 4096, 1 << 20]),
    limit=st.sampled_from([1, 10_000, 1 << 30]),
)
def test_pump_recv_matches_the_stream_for_any_receives(
    core: types.ModuleType, seed: int, packet_size: int, budget: int, max_slice: int, limit: int
) -> None:
    if packet_size > 4096 and max_slice == 1:
        max_slice = 97  # the same paths, in a tenth of the time
    stream, want, npackets = _stream(seed, packet_size)
    out, packets, statuses = run_pump_recv(
        core, stream, seed=seed, budget=budget, max_slice=max_slice, limit=limit
    )
    assert {k: bytes(v) for k, v in out.items()} == want
    assert packets == npackets
    assert core.PUMP_ACCEPTED not in statuses


def test_pump_recv_results_are_identical_across_cores() -> None:
    import vfiomig._core as core_module

    stream, _, _ = _stream(5, 70_000)
    results = [
        run_pump_recv(ns, stream, seed=9, budget=100_000, max_slice=30_000, limit=50_000)
        for ns in core_module.IMPLEMENTATIONS.values()
    ]
    assert all(r == results[0] for r in results)


def _accepted_mid_packet(
    core: types.ModuleType, error: OSError | None, size: int
) -> tuple[object, object]:
    key = DEVICES[0]
    buf = core.ReorderBuffer("d/0", core.Budget(1 << 20))
    buf.open_gate()
    pkt = encode_packet(key[0], key[1], 0, 0, b"y" * size)
    f = core.Framer(uuid=UUID, channels=4)
    f.feed(encode_handshake(UUID, 1))
    assert isinstance(f.next_event(), core.ChannelHello)
    recv = ScriptedRecv(pkt[:60_000], 1, 4096, error=error)
    recv.rng.random = lambda: 1.0  # type: ignore[method-assign]  # never would-block
    return f, lambda: f.pump_recv(recv, {key: buf}, 1 << 30)


# 100 000 bytes: received into the framer's buffer; 300 000: into the packet's own buffer.
@pytest.mark.parametrize("size", [100_000, 300_000])
def test_pump_recv_end_inside_a_packet_is_the_references_error(
    core: types.ModuleType, size: int
) -> None:
    _f, pump = _accepted_mid_packet(core, None, size)
    with pytest.raises(
        core.StreamIncompleteError,
        match=rf"^0000:00:04.0/vfio/0: channel ended inside packet idx 0 \(59712 of {size} bytes\)$",
    ) as e:
        pump()  # type: ignore[operator]
    assert (e.value.device, e.value.idx) == ("0000:00:04.0/vfio/0", 0)


@pytest.mark.parametrize("size", [100_000, 300_000])
def test_pump_recv_passes_receive_errors_on_with_the_packet_current(
    core: types.ModuleType, size: int
) -> None:
    err = ConnectionResetError(104, "Connection reset by peer")
    f, pump = _accepted_mid_packet(core, err, size)
    with pytest.raises(ConnectionResetError):
        pump()  # type: ignore[operator]
    cur = f.current  # type: ignore[attr-defined]
    assert (cur.idstr, cur.idx, cur.size) == (DEVICES[0][0], 0, size)
    # Received: read into the packet's buffer, or still in the framer's.
    assert size - f.payload_remaining + f.buffered == 59_712  # type: ignore[attr-defined]


def test_pump_recv_would_block_and_limit(core: types.ModuleType) -> None:
    key = DEVICES[0]
    buf = core.ReorderBuffer("d/0", core.Budget(1 << 20))
    buf.open_gate()
    f = _hello(core, b"")
    pkt = encode_packet(key[0], key[1], 0, 0, b"z" * 10)

    def nothing(view: memoryview) -> int:
        raise BlockingIOError

    assert f.pump_recv(nothing, {key: buf}, 1 << 20) == (core.PUMP_WOULD_BLOCK, 0, None)
    chunks = [pkt[:5], pkt[5:]]

    def two(view: memoryview) -> int:
        if not chunks:
            raise BlockingIOError
        c = chunks.pop(0)
        view[: len(c)] = c
        return len(c)

    assert f.pump_recv(two, {key: buf}, 5) == (core.PUMP_NEED_DATA, 0, None)
    assert f.pump_recv(two, {key: buf}, 5) == (core.PUMP_NEED_DATA, 1, None)
    assert f.pump_recv(two, {key: buf}, 5) == (core.PUMP_WOULD_BLOCK, 0, None)
    assert bytes(buf.take_ready().chunks[0]) == b"z" * 10


@pytest.mark.parametrize("size", [100, 300_000])  # kept in the block / its own buffer
def test_defer_payload_refuses_what_it_cannot_take(core: types.ModuleType, size: int) -> None:
    f, bufs, _ = _channel(core, 1 << 30)
    key = DEVICES[0]
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    pk = device_packets(key[0], key[1], data, wrap_config(b"c"), size)[0]
    with pytest.raises(AssertionError, match="no packet data to defer"):
        f.defer_payload(bufs[key])  # before any packet
    f.feed(encode_handshake(UUID, 0))
    assert f.next_event() is not core.NEED_DATA
    rest = [pk[: len(pk) - size + 10]]  # the header and ten bytes of the data

    def recv(view: memoryview) -> int:
        if not rest:
            raise BlockingIOError
        chunk = rest.pop()
        view[: len(chunk)] = chunk
        return len(chunk)

    status, _, hdr = f.pump_recv(recv, {}, 1 << 30)
    assert status == core.PUMP_HEADER and hdr.size == size
    assert bufs[key].offer(hdr.version, hdr.idx, hdr.flags, hdr.size)
    f.read_payload_into(memoryview(bytearray(4)))  # four bytes of its data taken here
    with pytest.raises(AssertionError, match="read in part"):
        f.defer_payload(bufs[key])
