"""Models of the things a benchmark run measures against: a device that loads at a set
bandwidth with a set per-write latency, a config load of a set duration, and the lower
bound on downtime that these and the link model impose.

The device model keeps its own timeline: a write of ``n`` bytes occupies the device for
``latency + n / bandwidth`` seconds, starting when the loader calls ``write``. The write
returns at the end of that time, like a blocking write to a VFIO data fd. Oversleeping
(the event loop wakes the loader a little late) is the harness's artefact, not the
receiver's, so it is absorbed: the next write starts from the model's end time plus the
time the loader really spent between the two writes, never from the late wake-up.
Whatever the loader does between writes (waiting for data, its own bookkeeping) stays
idle device time, which is exactly what the benchmark is there to measure.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from vfiomig.sinks import Chunk, ConfigTarget, Sink


class Overhead:
    """Time spent in harness code inside the receiver process, in seconds."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


class DeviceModelSink(Sink):
    """A device that loads ``bandwidth`` bytes/s with ``latency`` seconds per write.

    ``busy_seconds`` is the time the modelled device spent loading; ``late_seconds`` the
    total oversleep that the model absorbed (how far the event loop's wake-ups lagged).
    """

    def __init__(self, bandwidth: float, latency: float, overhead: Overhead | None = None) -> None:
        if bandwidth <= 0:
            raise ValueError(f"device bandwidth {bandwidth} must be positive")
        if latency < 0:
            raise ValueError(f"device write latency {latency} must not be negative")
        self.bandwidth = bandwidth
        self.latency = latency
        self.description = (
            f"device model {bandwidth / 2**20:.0f} MiB/s, {latency * 1e6:.0f} us/write"
        )
        self.bytes_written = 0
        self.writes = 0
        self.busy_seconds = 0.0
        self.late_seconds = 0.0
        self._overhead = overhead or Overhead()
        self.first_write_at: float | None = None  # trio time of the first write
        self._end: float | None = None  # model time the previous write ended
        self._woke = 0.0  # real time the previous write returned

    async def write(self, chunks: Sequence[Chunk]) -> None:
        t0 = time.perf_counter()
        now = trio.current_time()
        n = 0
        for c in chunks:
            n += len(c)
        cost = self.latency + n / self.bandwidth
        # The device was idle for as long as the loader really took since the last write
        # returned; the loader's late wake-up itself is not device time.
        start = now if self._end is None else self._end + max(0.0, now - self._woke)
        if self.first_write_at is None:
            self.first_write_at = now
        end = start + cost
        self._end = end
        self.bytes_written += n
        self.writes += 1
        self.busy_seconds += cost
        self._overhead.seconds += time.perf_counter() - t0
        await trio.sleep_until(end)
        self._woke = trio.current_time()
        self.late_seconds += self._woke - end


class ConfigModel(ConfigTarget):
    """Loads a config blob in ``seconds`` (QEMU measured about 70 ms per device)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.description = f"config model {seconds * 1000:g} ms"
        self.data: bytes | None = None

    async def load_config(self, data: bytes) -> None:
        self.data = data
        await trio.sleep(self.seconds)


@dataclass(frozen=True, slots=True)
class Bound:
    """The lower bound on one run's downtime and what sets it."""

    seconds: float
    link_seconds: float
    device_seconds: float
    config_seconds: float
    limit: str  # "link", "device", "config" (nothing else limits), or "none"


def lower_bound(
    device_bytes: Sequence[int],
    *,
    device_bandwidth: float | None,
    config_seconds: float,
    wire_bytes: int = 0,
    link_rate: float | None = None,
    channel_bytes: Sequence[int] = (),
    channel_rates: Sequence[float | None] = (),
) -> Bound:
    """The fastest this run could possibly be, whatever the receiver does.

    The slowest of: the wire bytes over the total link rate, each channel's bytes over its
    own rate (the sender chose the channel of every packet), and each device's bytes over
    its load bandwidth; plus the config load, which can only start once a device's last
    byte is in. Per-write latency is left out: a receiver may batch writes to amortise it.
    With no link rate and no device model there is no model limit: the bound is then the
    config time alone and ``limit`` says ``"config"`` (or ``"none"`` if that is zero).
    """
    link = 0.0
    if link_rate:
        link = wire_bytes / link_rate
    for nbytes, rate in zip(channel_bytes, channel_rates, strict=False):
        if rate:
            link = max(link, nbytes / rate)
    device = 0.0
    if device_bandwidth:
        device = max((b / device_bandwidth for b in device_bytes), default=0.0)
    body = max(link, device)
    if body > 0:
        limit = "link" if link >= device else "device"
    else:
        limit = "config" if config_seconds > 0 else "none"
    return Bound(body + config_seconds, link, device, config_seconds, limit)


__all__ = ["Bound", "ConfigModel", "DeviceModelSink", "Overhead", "lower_bound"]
