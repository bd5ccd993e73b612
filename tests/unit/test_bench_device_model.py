"""The device model's pacing, on trio's mock clock (no wall-clock timing)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio
import trio.testing

from vfiomig.bench import ConfigModel, DeviceModelSink, Overhead

MiB = 2**20


T = TypeVar("T")


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(fn, clock=clock)


def test_back_to_back_writes_take_bytes_over_bandwidth_plus_latency() -> None:
    async def main() -> float:
        sink = DeviceModelSink(100 * MiB, 0.001)
        t0 = trio.current_time()
        for _ in range(50):
            await sink.write([bytes(MiB)])
        assert sink.writes == 50 and sink.bytes_written == 50 * MiB
        assert sink.busy_seconds == pytest.approx(0.5 + 0.05)
        return trio.current_time() - t0

    assert _run(main) == pytest.approx(0.55, rel=1e-9)


def test_chunks_of_one_write_share_one_latency() -> None:
    async def main() -> float:
        sink = DeviceModelSink(10 * MiB, 0.01)
        t0 = trio.current_time()
        await sink.write([bytes(MiB)] * 4)
        return trio.current_time() - t0

    assert _run(main) == pytest.approx(0.4 + 0.01, rel=1e-9)


def test_loader_gaps_are_idle_device_time() -> None:
    async def main() -> float:
        sink = DeviceModelSink(MiB, 0.0)
        t0 = trio.current_time()
        for _ in range(3):
            await sink.write([bytes(MiB // 2)])
            await trio.sleep(0.25)  # the loader waits for data: the device idles
        return trio.current_time() - t0

    assert _run(main) == pytest.approx(3 * 0.5 + 3 * 0.25, rel=1e-9)


def test_late_wakeups_are_absorbed_not_accumulated() -> None:
    # Make wake-ups late by up to 2 ms: the clock jumps past the sink's deadlines.
    # The model's end times are absolute, so the total stays bytes/bandwidth plus one
    # final lateness, instead of growing by 2 ms per write.
    async def main() -> tuple[float, float]:
        sink = DeviceModelSink(100 * MiB, 0.0)
        t0 = trio.current_time()
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        done = False

        async def hog() -> None:
            # Jump the clock 2 ms past every deadline the sink sleeps to.
            while not done:
                await trio.testing.wait_all_tasks_blocked()
                clock.jump(0.002)  # time passes while the sink sleeps: it wakes late
                await trio.sleep(0.004)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
            for _ in range(100):
                await sink.write([bytes(MiB)])
            done = True
            nursery.cancel_scope.cancel()
        return trio.current_time() - t0, sink.late_seconds

    elapsed, late = _run(main)
    assert late > 0  # the hog did make wake-ups late
    assert elapsed == pytest.approx(1.0, abs=0.01)  # not 1.0 + 100 * lateness


def test_overhead_and_config_model() -> None:
    async def main() -> float:
        overhead = Overhead()
        sink = DeviceModelSink(MiB, 0.0, overhead)
        await sink.write([b"x"])
        assert overhead.seconds > 0
        config = ConfigModel(0.07)
        t0 = trio.current_time()
        await config.load_config(b"blob")
        assert config.data == b"blob"
        return trio.current_time() - t0

    assert _run(main) == pytest.approx(0.07)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        DeviceModelSink(0, 0.0)
    with pytest.raises(ValueError, match="latency"):
        DeviceModelSink(MiB, -1.0)
