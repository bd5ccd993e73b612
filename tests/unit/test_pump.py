"""`Framer.pump`: many packets per call, routed into reorder buffers, on both cores.

The slow path of these drivers is what `vfiomig._channels` does with a status other than
NEED_DATA/END, so any slicing, budget and route set must give the per-packet result.
"""

from __future__ import annotations

import random
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiomig._core._wire import encode_handshake, encode_packet, encode_ram_packet
from vfiomig.testing import device_packets, wrap_config

UUID = bytes(range(16))
DEVICES = [("0000:00:04.0/vfio", 0), ("0000:00:05.0/vfio", 1)]


def _drain(bufs: dict[tuple[str, int], object], out: dict[tuple[str, int], bytearray]) -> None:
    for key, b in bufs.items():
        while (r := b.take_ready()) is not None:  # type: ignore[attr-defined]
            for c in r.chunks:
                out[key] += c
            b.written(r.nbytes)  # type: ignore[attr-defined]


def run_pump(
    core: types.ModuleType, stream: bytes, *, seed: int, budget: int, max_slice: int
) -> tuple[dict[tuple[str, int], bytearray], dict[tuple[str, int], bytes | None], int, int]:
    """Feed one channel through pump(); return written data, configs, packets, slow ones."""
    rng = random.Random(seed)
    bud = core.Budget(budget)
    bufs = {k: core.ReorderBuffer(f"{k[0]}/{k[1]}", bud) for k in DEVICES}
    for b in bufs.values():
        b.open_gate()
    out = {k: bytearray() for k in DEVICES}
    f = core.Framer(uuid=UUID, channels=4, ram_page_count=2)
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
        key = (hdr.idstr, hdr.instance)
        buf = bufs[key]
        if status == core.PUMP_HEADER:
            while not buf.offer(hdr.version, hdr.idx, hdr.flags, hdr.size):
                _drain(bufs, out)  # the loader runs while the reader is parked
        else:
            assert status == core.PUMP_ACCEPTED
        data = bytearray(hdr.size)
        got = 0
        while got < hdr.size:
            got += f.read_payload_into(memoryview(data)[got:])
            if got < hdr.size:
                feed()
        buf.deliver(hdr.idx, bytes(data))
        packets += 1
        if rng.random() < 0.7:
            routes[key] = buf  # a device joins the fast path after its first packet
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


def _hello(core: types.ModuleType, rest: bytes) -> object:
    f = core.Framer(uuid=UUID, channels=4)
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
    assert (status, done, hdr.idx) == (core.PUMP_HEADER, 1, 2)
    f.take_payload()
    ready = buf.take_ready()
    buf.written(ready.nbytes)  # idx 1 is over budget: accepted only once the loader is idle
    f2 = _hello(core, pkts[1][:-3])
    status, done, hdr = f2.pump({key: buf})
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
