# ruff: noqa: SIM117  (fail_after stays its own block, around the whole test)
"""The kernel VFIO source end to end: a fake kernel device (source) -> `send_migration`
-> `serve_receiver` with its control server -> a fake kernel device (destination), with
and without PRE_COPY, and the faults: the device, the data fd, the precopy-info ioctl,
the receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.integration.control_helpers import IDSTR, UUID, Running, running_receiver
from vfiomig import MigrationFailed, SendDevice, send_migration
from vfiomig.send import PrecopyOptions, SendReport
from vfiomig.testing import FakeVfioDevice
from vfiomig.testing._fake_saving import SavingModel
from vfiomig.vfio import VfioSink, VfioSource
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import MigState as S

PRE_COPY = uapi.VFIO_MIGRATION_STOP_COPY | uapi.VFIO_MIGRATION_P2P | uapi.VFIO_MIGRATION_PRE_COPY
NO_PRE_COPY = uapi.VFIO_MIGRATION_STOP_COPY | uapi.VFIO_MIGRATION_P2P
MODEL = SavingModel(stop_copy=300_000, initial=500_000, dirty=[100_000, 20_000], seed=3)


@dataclass
class Pair:
    src: FakeVfioDevice
    dst: FakeVfioDevice
    source: VfioSource
    sink: VfioSink


@contextmanager
def devices(flags: int = PRE_COPY, **fake: object) -> Iterator[Pair]:
    model = fake.pop("saving", MODEL)
    with FakeVfioDevice(flags=flags, saving=model, **fake) as src:  # type: ignore[arg-type]
        with FakeVfioDevice() as dst:
            source = VfioSource.from_device_fd(
                src.open(), owned=True, ioctl=src.ioctl, read=src.read
            )
            sink = VfioSink.from_device_fd(dst.open(), owned=True, ioctl=dst.ioctl, write=dst.write)
            yield Pair(src, dst, source, sink)


@asynccontextmanager
async def receiver(tmp_path: Path, pair: Pair) -> AsyncIterator[Running]:
    async with running_receiver(
        tmp_path, [(IDSTR, 0, pair.sink)], channels=3, stall_timeout=5
    ) as rx:
        yield rx


async def send(rx: Running, pair: Pair, **options: object) -> SendReport:
    return await send_migration(
        connect_to=[rx.data_address],
        channels=3,
        uuid=UUID,
        devices=[SendDevice(IDSTR, 0, pair.source)],
        packet_size=64 << 10,
        control=rx.control_address,
        control_timeout=10,
        **options,  # type: ignore[arg-type]
    )


def saved(fake: FakeVfioDevice) -> bytes:
    assert fake.saving_session is not None
    return bytes(fake.saving_session.saved)


@pytest.mark.parametrize("precopy", [True, False])
async def test_fake_device_to_fake_device_byte_identical(tmp_path: Path, precopy: bool) -> None:
    with devices() as pair:
        with trio.fail_after(30):
            async with receiver(tmp_path, pair) as rx:
                options = PrecopyOptions(threshold=10_000, rounds=8 if precopy else 0)
                report = await send(rx, pair, precopy_options=options)
        data = saved(pair.src)
        assert pair.dst.loaded == data
        if precopy:
            assert len(data) == 500_000 + 100_000 + 20_000 + 300_000
            phase = report.precopy[f"{IDSTR}/0"]
            assert (phase.rounds, phase.bytes, phase.stopped) == (3, 620_000, "converged")
            assert phase.pending == (500_000, 100_000, 20_000, 0)
            assert report.bytes == 300_000  # only the STOP_COPY data went as multifd packets
            assert pair.src.arcs == [
                (S.RUNNING, S.PRE_COPY),
                (S.PRE_COPY, S.PRE_COPY_P2P),
                (S.PRE_COPY_P2P, S.STOP_COPY),
                (S.STOP_COPY, S.STOP),
            ]
        else:
            assert len(data) == 300_000 and report.precopy == {}
            assert pair.src.arcs == [
                (S.RUNNING, S.RUNNING_P2P),
                (S.RUNNING_P2P, S.STOP),
                (S.STOP, S.STOP_COPY),
                (S.STOP_COPY, S.STOP),
            ]
        assert pair.src.state == S.STOP and pair.src.resets == 0
        assert (pair.dst.state, pair.dst.resets) == (S.STOP, 0)
        (outcome,) = rx.outcome
        assert not isinstance(outcome, MigrationFailed)


async def test_device_without_pre_copy_and_short_reads(tmp_path: Path) -> None:
    model = SavingModel(stop_copy=250_001, max_read=3_000, seed=5)
    with devices(flags=uapi.VFIO_MIGRATION_STOP_COPY, saving=model) as pair:
        with trio.fail_after(30):
            async with receiver(tmp_path, pair) as rx:
                report = await send(rx, pair)
        assert pair.dst.loaded == saved(pair.src) and len(saved(pair.src)) == 250_001
        assert report.precopy == {}
        # No P2P: the kernel skips RUNNING_P2P.
        assert pair.src.arcs[0] == (S.RUNNING, S.STOP) and pair.src.state == S.STOP
        # Short reads were joined: every data packet but the last is full.
        assert report.per_device[f"{IDSTR}/0"] == (250_001, 5)
