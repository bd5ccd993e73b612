"""``vfiomig demo``: a sender and a receiver on loopback, verified.

Two devices of synthetic state travel over 4 TCP channels in shuffled order; the receiver
hashes what lands in each device's sink and the demo checks it against the sha256 of the
state that was sent, and the config blobs byte for byte. The report goes to stdout; the
progress bar, on a terminal only, to stderr.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import trio

from vfiomig._core._wire import device_name
from vfiomig.cli._progress import bar, draw_progress
from vfiomig.receive import DeviceSetup, ReceiverConfig, Session, SessionReport, serve_receiver
from vfiomig.send import SendDevice, send_migration
from vfiomig.sinks import Chunk, Sink
from vfiomig.sources import SynthSource
from vfiomig.testing import MemoryConfig, synth_config, synth_sha256

CHANNELS = 4
PACKET = 1024 * 1024
DEVICES = (("0000:00:04.0/vfio", 0, 11), ("0000:00:05.0/vfio", 0, 12))


class HashSink(Sink):
    """Hashes the stream in a worker thread (hashlib releases the GIL), keeping nothing."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.bytes = 0
        self.description = "sha256"

    async def write(self, chunks: Sequence[Chunk]) -> None:
        def update() -> None:
            for c in chunks:
                self.hash.update(c)

        await trio.to_thread.run_sync(update)
        self.bytes += sum(len(c) for c in chunks)


async def _demo(size: int, progress: bool) -> int:
    uuid = os.urandom(16)
    sinks = [HashSink() for _ in DEVICES]
    configs = [MemoryConfig() for _ in DEVICES]
    setups = [
        DeviceSetup(idstr, inst, sink, cfg)
        for (idstr, inst, _), sink, cfg in zip(DEVICES, sinks, configs, strict=True)
    ]
    config = ReceiverConfig(
        uuid=uuid, channels=CHANNELS, devices=setups, listen=["tcp:127.0.0.1:0"]
    )
    total = size * len(DEVICES)
    print(
        f"vfiomig demo: {len(DEVICES)} devices x {size / 2**20:.0f} MiB of synthetic state,"
        f" {CHANNELS} TCP channels on loopback, {PACKET // 1024} KiB packets, shuffled order",
        flush=True,
    )
    reports: list[SessionReport] = []
    async with trio.open_nursery() as nursery:

        async def receive(task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
            reports.append(await serve_receiver(config, task_status=task_status))

        session: Session = await nursery.start(receive)
        if progress:

            def describe() -> str:
                done = sum(s.bytes for s in sinks)
                return (
                    f"  {bar(done, total)} {done / 2**20:7.1f} MiB landed,"
                    f" {session.budget.queued / 2**20:6.1f} MiB queued"
                )

            nursery.start_soon(draw_progress, session.done, describe)
        devices = [
            SendDevice(idstr, inst, SynthSource(size, seed)) for idstr, inst, seed in DEVICES
        ]
        await send_migration(
            connect_to=session.bound,
            channels=CHANNELS,
            uuid=uuid,
            devices=devices,
            packet_size=PACKET,
            order="shuffle",
            window=32,
            seed=1,
        )
    report = reports[0]
    ok = True
    print(
        f"loaded {total / 2**20:.0f} MiB in {report.seconds:.2f} s"
        f" ({total / report.seconds / 1e6:.0f} MB/s),"
        f" peak queued {report.peak_queued_bytes / 2**20:.1f} MiB"
    )
    for (idstr, inst, seed), sink, cfg, dev in zip(
        DEVICES, sinks, configs, report.devices, strict=True
    ):
        want = await trio.to_thread.run_sync(synth_sha256, size, seed)
        got = sink.hash.hexdigest()
        match = got == want and cfg.data == synth_config(seed)
        ok = ok and match
        print(
            f"  {device_name(idstr, inst)}: {dev.bytes / 2**20:.0f} MiB in {dev.packets} packets,"
            f" starved {dev.starved_seconds * 1000:.0f} ms, sha256 {got[:16]}..."
            f" {'verified' if match else 'MISMATCH (expected ' + want[:16] + '...)'}"
        )
    print("demo: ok" if ok else "demo: FAILED")
    return 0 if ok else 1


def run_demo(size: int, *, progress: bool) -> int:
    """Run the demo; ``progress`` draws a bar on stderr (see `_progress.wanted`)."""
    return trio.run(_demo, size, progress)
