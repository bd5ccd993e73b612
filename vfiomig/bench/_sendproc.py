"""The benchmark's sender process: ``python -m vfiomig.bench._sendproc JSON``.

Throughput runs put the sender in its own process so that it does not share the
receiver's interpreter (this machine has 2 cores). The JSON argument says what to send;
one JSON line on stdout says what was sent. Its source costs next to nothing per byte:
every packet is the same seeded block, copied into the sender's buffers a buffer at a
time, so the receiver, the sink model or the link model is the limit, not the synthetic
state generator.

What the line gives bench besides the bytes and times: ``cpu_seconds``, this process's CPU
time (every thread) from just before the send to its end, and ``busy``, that over the
wall time of the send (``t_end - t_start``). A sender near 1.0 busy used a whole core:
that cell's limit may have been the sender rather than the receiver.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import trio

from vfiomig._core._wire import wrap_config
from vfiomig.send import PrecopyOptions, SendDevice, send_migration
from vfiomig.sources import Source
from vfiomig.testing import FakeVfioDevice
from vfiomig.testing._fake_saving import SavingModel
from vfiomig.vfio import VfioSource
from vfiomig.vfio._uapi import (
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
)

from ._seq import send_sequential


class PatternSource(Source):
    """``size`` bytes made of one seeded block of ``block`` bytes, repeated."""

    def __init__(self, size: int, block: int, seed: int) -> None:
        self.size = size
        self.block = np.random.default_rng(seed).bytes(block)
        self.seed = seed
        self.left = size
        self.first_read: float | None = None  # time.monotonic() of the first read
        self._tiled = b""
        self.description = f"pattern:{size}:{seed}"

    fills_buffers = True

    def _started(self) -> None:
        if self.first_read is None:
            # The sender reads right before it queues packets for the channels: this is
            # when the first packet starts on its way (after every channel's handshake).
            self.first_read = time.monotonic()

    async def read(self, max_bytes: int) -> bytes:
        self._started()
        n = min(max_bytes, self.left, len(self.block))
        self.left -= n
        await trio.lowlevel.checkpoint()
        # A whole-block slice is the block itself: no copy per packet.
        return self.block if n == len(self.block) else self.block[:n]

    async def read_into(self, buf: memoryview) -> int:
        # The sender's buffers hold whole packets: the block repeated, one copy a buffer.
        self._started()
        n = min(len(buf), self.left)
        if len(self._tiled) < n:
            self._tiled = self.block * -(-len(buf) // len(self.block))
        buf[:n] = memoryview(self._tiled)[:n]
        self.left -= n
        await trio.lowlevel.checkpoint()
        return n

    async def config_blob(self) -> bytes:
        return wrap_config(np.random.default_rng([self.seed, 0xC0F16]).bytes(256))

    async def start(self) -> None:
        self._started()  # the C send path reads nothing here: it starts right after

    def native_stream(self) -> tuple[object, ...] | None:
        # The C send path's packets point into one tiled chunk of the block: no copy.
        return ("pattern", self.left, self.block) if self.left == self.size else None


class _TimedVfioSource(VfioSource):
    """Notes when the device stops (SET STOP_COPY): where the downtime starts."""

    t_stop: float | None = None

    async def start(self) -> None:
        self.t_stop = time.monotonic()
        await super().start()


async def _run_vfio(job: dict[str, Any]) -> dict[str, Any]:
    """A kernel VFIO device model with PRE_COPY (the precopy scenario, `_precopy`)."""
    flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY
    with FakeVfioDevice(flags=flags, saving=SavingModel(**job["model"])) as fake:
        source = _TimedVfioSource(
            device_fd=fake.open(), owned=True, ioctl=fake.ioctl, read=fake.read
        )
        t0 = time.monotonic()
        report = await send_migration(
            connect_to=list(job["connect"]),
            channels=int(job["channels"]),
            uuid=bytes.fromhex(job["uuid"]),
            devices=[SendDevice(job["idstr"], 0, source)],
            packet_size=int(job["packet_size"]),
            control=job["control"],
            precopy_options=PrecopyOptions(int(job["threshold"]), int(job["rounds"])),
        )
    phase = report.precopy.get(f"{job['idstr']}/0")
    return {
        "ok": True,
        "bytes": report.bytes,
        "t_start": t0,
        "t_stop": source.t_stop,
        "t_end": time.monotonic(),
        "precopy_bytes": 0 if phase is None else phase.bytes,
        "precopy_rounds": 0 if phase is None else phase.rounds,
    }


async def _run(job: dict[str, Any]) -> dict[str, Any]:
    if job["mode"] == "vfio":
        return await _run_vfio(job)
    packet = int(job["packet_size"])
    sources = [PatternSource(int(d["size"]), packet, int(d["seed"])) for d in job["devices"]]
    if job["mode"] == "seq":
        wire, t0 = await send_sequential(job["connect"][0], sources, packet, job.get("rate"))
        return {
            "ok": True,
            "wire_bytes": wire,
            "t_start": t0,
            "t_first": _first(sources),
            "t_end": time.monotonic(),
        }
    devices = [
        SendDevice(d["idstr"], int(d["instance"]), src)
        for d, src in zip(job["devices"], sources, strict=True)
    ]
    t0 = time.monotonic()
    report = await send_migration(
        connect_to=list(job["connect"]),
        channels=int(job["channels"]),
        uuid=bytes.fromhex(job["uuid"]),
        devices=devices,
        packet_size=packet,
        order=job["order"],
        seed=int(job["seed"]),
        channel_rate=job.get("channel_rate"),
        channel_rates=job.get("channel_rates"),
        link_rate=job.get("link_rate"),
    )
    return {
        "ok": True,
        "bytes": report.bytes,
        "packets": report.packets,
        "wire_bytes": sum(report.channel_bytes),
        "channel_bytes": list(report.channel_bytes),
        "t_start": t0,
        "t_first": _first(sources),
        "t_end": time.monotonic(),
    }


def _first(sources: list[PatternSource]) -> float | None:
    return min((s.first_read for s in sources if s.first_read is not None), default=None)


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    cpu0 = time.process_time()
    result = trio.run(_run, job)
    result["cpu_seconds"] = time.process_time() - cpu0
    wall = result["t_end"] - result["t_start"]
    result["busy"] = result["cpu_seconds"] / wall if wall > 0 else 0.0
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
