from __future__ import annotations

import random
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit import sim
from vfiomig._core._reorder import ReorderBuffer
from vfiomig._core._wire import wrap_config
from vfiomig.testing import channel_streams, device_packets

UUID = bytes(range(16))
CFG = wrap_config(b"config-body")


def fresh(core: types.ModuleType, budget: int = 1 << 30) -> ReorderBuffer:
    buf: ReorderBuffer = core.ReorderBuffer("dev/0", core.Budget(budget))
    return buf


def put(buf: ReorderBuffer, idx: int, data: bytes, flags: int = 0) -> bool:
    if not buf.offer(0, idx, flags, len(data)):
        return False
    buf.deliver(idx, data)
    return True


def drain(buf: ReorderBuffer) -> bytes:
    out = bytearray()
    while (r := buf.take_ready()) is not None:
        for c in r.chunks:
            out += c
        buf.written(r.nbytes)
    return bytes(out)


def test_in_order_writes_and_config_last(core: types.ModuleType) -> None:
    buf = fresh(core)
    buf.open_gate()
    put(buf, 2, b"cc")
    put(buf, 3, CFG, flags=1)
    assert drain(buf) == b"" and not buf.finishable
    put(buf, 0, b"a")
    assert drain(buf) == b"a"
    put(buf, 1, b"")  # zero-length data is skipped, never written
    assert drain(buf) == b"cc"
    assert buf.finishable and buf.config == CFG
    buf.mark_loaded()
    st = buf.statistics()
    assert (st.written_bytes, st.queued_bytes, st.queued_packets, st.loaded) == (3, 0, 0, True)


def test_an_error_during_the_finish_step_is_raised_by_mark_loaded(core: types.ModuleType) -> None:
    # The loader runs the finish step (config load, sink finish) with the buffer
    # finishable; a second config packet may arrive meanwhile and poison it.
    buf = fresh(core)
    buf.open_gate()
    put(buf, 0, b"a")
    put(buf, 1, CFG, flags=1)
    assert drain(buf) == b"a" and buf.finishable
    with pytest.raises(core.ConfigStateError, match="second config packet idx 7") as first:
        buf.offer(0, 7, 1, len(CFG))
    with pytest.raises(core.ConfigStateError) as again:
        buf.mark_loaded()
    assert str(again.value) == str(first.value) and not buf.statistics().loaded


def test_gate_holds_data_but_not_precopy(core: types.ModuleType) -> None:
    buf = fresh(core)
    put(buf, 0, b"data")
    buf.add_precopy(b"pre1")
    buf.add_precopy(b"pre2")
    assert drain(buf) == b"pre1pre2"
    put(buf, 1, CFG, flags=1)
    assert not buf.finishable
    buf.open_gate()
    assert drain(buf) == b"data"
    assert buf.finishable


def test_precopy_after_multifd_data_is_an_error(core: types.ModuleType) -> None:
    buf = fresh(core)
    buf.open_gate()
    put(buf, 0, b"x")
    drain(buf)
    with pytest.raises(core.PacketError, match="dev/0: precopy data after multifd data idx 0"):
        buf.add_precopy(b"late")


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([(0, 9, 0, 1)], r"dev/0: packet idx 9 has unknown version 1 \(expected 0\)"),
        ([(0, 0xFFFFFFFF, 0, 0)], r"dev/0: packet index is invalid \(0xffffffff\)"),
        ([(0, 4, 0, 0), (0, 4, 0, 0)], "dev/0: packet idx 4 already received"),
        ([(0, 0, 0, 0), (0, 0, 0, 0)], "dev/0: packet idx 0 already"),
        ([(0, 5, 1, 0), (0, 6, 1, 0)], r"dev/0: second config packet idx 6 \(first was idx 5\)"),
        ([(0, 5, 1, 0), (0, 7, 0, 0)], r"dev/0: data packet idx 7 is above the config idx 5"),
        ([(0, 9, 0, 0), (0, 5, 1, 0)], "dev/0: config packet idx 5 is below data idx 9"),
        ([(0, 3, 1, 0), (0, 3, 0, 0)], "dev/0: packet idx 3 already received"),
    ],
)
def test_rule_violations(core: types.ModuleType, steps, message: str) -> None:  # type: ignore[no-untyped-def]
    buf = fresh(core)
    with pytest.raises(core.PacketError, match=message):
        for version_or_zero, idx, flags, version in steps:
            del version_or_zero
            data = CFG if flags else b"x"
            if buf.offer(version, idx, flags, len(data)):
                buf.deliver(idx, data)
    with pytest.raises(core.PacketError, match=message):  # poisoned
        buf.offer(0, 100, 0, 1)


def test_already_written_idx(core: types.ModuleType) -> None:
    buf = fresh(core)
    buf.open_gate()
    put(buf, 0, b"x")
    drain(buf)
    with pytest.raises(core.PacketError, match="dev/0: packet idx 0 already written"):
        put(buf, 0, b"x")


def test_malformed_config_blob(core: types.ModuleType) -> None:
    buf = fresh(core)
    with pytest.raises(core.ConfigStateError, match="dev/0: config packet idx 0 starts with"):
        put(buf, 0, b"\0" * 20, flags=1)


def test_budget_backpressure(core: types.ModuleType) -> None:
    buf = fresh(core, budget=10)
    buf.open_gate()
    assert put(buf, 1, b"x" * 6)
    assert not buf.offer(0, 2, 0, 6)  # would exceed the budget: wait
    assert put(buf, 0, b"y" * 6)  # the next idx to write is always accepted
    assert buf.budget.queued == 12
    assert drain(buf) == b"y" * 6 + b"x" * 6
    assert buf.budget.queued == 0
    assert put(buf, 2, b"z" * 6)
    assert put(buf, 3, CFG, flags=1)  # config packets are always accepted
    assert buf.budget.peak == max(12, 6 + len(CFG))


def test_backlog_cap_refuses_like_the_budget(core: types.ModuleType) -> None:
    """A device's own cap, under the budget's exceptions: the next idx while the loader
    is idle, and the config packet; 0 lifts it."""
    buf = fresh(core, budget=1000)
    buf.open_gate()
    assert buf.backlog_cap == 0
    buf.backlog_cap = 10
    assert put(buf, 1, b"x" * 6)
    assert not buf.offer(0, 2, 0, 6)  # 12 > 10, though the budget has room
    assert put(buf, 0, b"y" * 6)  # the next idx, the loader idle: accepted over the cap
    ready = buf.take_ready()
    assert ready is not None and ready.nbytes == 12
    assert not buf.offer(0, 2, 0, 1)  # the loader holds 12 unwritten: still over
    buf.written(ready.nbytes)
    assert put(buf, 2, b"z" * 6)
    assert put(buf, 4, CFG, flags=1)  # the config packet is always accepted
    assert not buf.offer(0, 3, 0, 6)  # idx 2 is not written yet: over the cap
    buf.backlog_cap = 0
    assert put(buf, 3, b"w" * 600)  # lifted: only the budget counts


def test_next_idx_waits_while_the_previous_packet_is_written(core: types.ModuleType) -> None:
    """The next-idx exemption gives one packet of slack per device, not two (SPEC §2)."""
    buf = fresh(core, budget=4)
    buf.open_gate()
    assert put(buf, 0, b"a" * 10)  # over budget, but the next idx with the loader idle
    ready = buf.take_ready()  # the loader writes idx 0 ...
    assert ready is not None and ready.end_idx == 1
    assert not buf.offer(0, 1, 0, 10)  # ... so idx 1, now the next idx, waits for it
    assert buf.budget.queued == 10
    buf.written(ready.nbytes)
    assert put(buf, 1, b"b" * 10)  # the loader is idle again: accepted
    assert buf.budget.peak == 10
    assert drain(buf) == b"b" * 10


def test_missing_report(core: types.ModuleType) -> None:
    buf = fresh(core)
    buf.open_gate()
    for i in (0, 2, 3, 7):
        put(buf, i, b"x")
    drain(buf)
    assert buf.missing() == ([1, 4, 5, 6], 4, True)
    err = buf.incomplete_error("every channel ended")
    assert str(err) == (
        "dev/0: every channel ended: missing idx 1, 4, 5, 6 (4 packets); config packet not received"
    )
    assert err.idx == 1
    many = fresh(core)
    put(many, 30, CFG, flags=1)
    first, count, no_config = many.missing()
    assert first == list(range(8)) and count == 30 and not no_config
    assert "missing idx 0, 1, 2, 3, 4, 5, 6, 7 and 22 more (30 packets)" in str(
        many.incomplete_error("x")
    )


@given(
    size=st.integers(0, 20000),
    packet=st.integers(1, 3000),
    channels=st.integers(1, 8),
    devices=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_arrival_order_gives_in_order_writes_config_last(
    size: int, packet: int, channels: int, devices: int, seed: int
) -> None:
    import vfiomig._core as core

    rng = random.Random(seed)
    names = [f"dev{d}/vfio" for d in range(devices)]
    states = {n: rng.randbytes(size) for n in names}
    packets = []
    for n in names:
        packets += device_packets(n, 0, states[n], wrap_config(n.encode()), packet)
    rng.shuffle(packets)  # any queue order: with an unbounded budget anything goes
    streams = channel_streams(packets, channels, UUID, seed=seed)
    result = sim.run(core, streams, [f"{n}/0" for n in names], uuid=UUID, seed=seed)
    for n in names:
        assert bytes(result.data[f"{n}/0"]) == states[n]
        assert result.config[f"{n}/0"] == wrap_config(n.encode())
    for name in result.data:
        ends = [e for d, _, e in result.order if d == name]
        firsts = [f for d, f, _ in result.order if d == name]
        assert firsts == ([0, *ends[:-1]] if ends else [])  # contiguous, increasing batches


@given(
    packets_n=st.integers(1, 60),
    channels=st.integers(1, 6),
    budget_packets=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_backpressure_never_deadlocks_a_rule_abiding_sender(
    packets_n: int, channels: int, budget_packets: int, seed: int
) -> None:
    """Queue order by idx, random channels: completes within budget + one packet per device."""
    import vfiomig._core as core

    rng = random.Random(seed)
    state = rng.randbytes(packets_n * 100)
    packets = device_packets("d", 0, state, wrap_config(b""), 100)
    streams = channel_streams(packets, channels, UUID, seed=seed)
    budget = budget_packets * 100
    result = sim.run(core, streams, ["d/0"], uuid=UUID, seed=seed, budget=budget)
    assert bytes(result.data["d/0"]) == state
    assert result.peak_queued <= budget + 100 + 16
