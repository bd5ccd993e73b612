# ruff: noqa: SIM117  (fail_after stays its own block, around the whole test)
"""The kernel VFIO source end to end: a fake kernel device (source) -> `send_migration`
-> `serve_receiver` with its control server -> a fake kernel device (destination), with
and without PRE_COPY, and the faults: the device, the data fd, the precopy-info ioctl,
the receiver."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.integration.control_helpers import IDSTR, UUID, Running, running_receiver
from vfiomig import MigrationFailed, SendDevice, SourceError, send_migration
from vfiomig.send import PrecopyOptions, SendError, SendReport
from vfiomig.send._control import ReceiverFailed
from vfiomig.testing import FakeVfioDevice
from vfiomig.testing._fake_saving import PrecopyEnd, SavingModel
from vfiomig.vfio import VfioSink, VfioSource
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import MigState as S

PRE_COPY = uapi.VFIO_MIGRATION_STOP_COPY | uapi.VFIO_MIGRATION_P2P | uapi.VFIO_MIGRATION_PRE_COPY
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


@pytest.mark.parametrize(("precopy", "end"), [(True, "ENOMSG"), (True, "EOF"), (False, "ENOMSG")])
async def test_fake_device_to_fake_device_byte_identical(
    tmp_path: Path, precopy: bool, end: PrecopyEnd
) -> None:
    """``end``: how a precopy round ends, ENOMSG as the uAPI documents (mlx5) or a 0-byte
    read as Linux's mtty sample gives (its data fd gives more after STOP_COPY)."""
    model = dataclasses.replace(MODEL, precopy_end=end)
    with devices(saving=model) as pair:
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
            # Without precopy the whole state is read while the device is stopped.
            assert len(data) == 500_000 + 300_000 and report.precopy == {}
            assert report.bytes == 800_000
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


# -- faults: the source device ends in RUNNING, the destination is reset, errors say why ---


def assert_nothing_half_moved(pair: Pair) -> None:
    assert pair.src.state == S.RUNNING
    assert pair.src.saving_session is None or not pair.src.saving_session.live
    assert pair.dst.state in (S.RUNNING, S.STOP) and not pair.dst.session_open


@pytest.mark.parametrize("error_state", [False, True])
async def test_failing_pre_copy_to_stop_copy_arc(tmp_path: Path, error_state: bool) -> None:
    fail = {(S.PRE_COPY_P2P, S.STOP_COPY): errno.EIO}
    with devices(fail_arcs=fail, error_on_failure=error_state) as pair:
        with trio.fail_after(30):
            async with receiver(tmp_path, pair) as rx:
                with pytest.raises(SendError) as info:
                    await send(rx, pair, precopy_options=PrecopyOptions(threshold=10_000))
        message = str(info.value)
        assert message.startswith(f"{IDSTR}/0: reading source vfio:fd ")
        assert "leaving PRE_COPY for STOP_COPY failed" in message and "errno 5" not in message
        assert "[Errno 5] Input/output error" in message
        if error_state:
            assert "device was in ERROR, reset to RUNNING: its state is lost" in message
            assert pair.src.resets == 1
        else:
            assert "device back in RUNNING from PRE_COPY_P2P" in message
            assert pair.src.resets == 0
        assert isinstance(info.value.__cause__, SourceError)
        assert info.value.__cause__.errno == errno.EIO
        assert_nothing_half_moved(pair)
        (outcome,) = rx.outcome  # the receiver was told (abort), not left to time out
        assert isinstance(outcome, MigrationFailed) and "abort" in str(outcome)


@pytest.mark.parametrize(("offset", "state"), [(700_000, "STOP_COPY"), (123_456, "PRE_COPY")])
async def test_data_fd_read_error_mid_stream(tmp_path: Path, offset: int, state: str) -> None:
    model = SavingModel(
        stop_copy=300_000, initial=500_000, dirty=[100_000], read_errno_at=(offset, errno.EIO)
    )
    with devices(saving=model) as pair:
        with trio.fail_after(30):
            async with receiver(tmp_path, pair) as rx:
                with pytest.raises((SendError, SourceError)) as info:
                    await send(rx, pair, precopy_options=PrecopyOptions(threshold=10_000))
        message = str(info.value)
        assert f"reading the data fd failed in {state} at byte {offset}" in message
        assert "Input/output error" in message and "device back in RUNNING" in message
        assert_nothing_half_moved(pair)
        (outcome,) = rx.outcome
        assert isinstance(outcome, MigrationFailed)


@pytest.mark.parametrize(
    ("lie", "stopped", "rounds"),
    [(lambda k: 1 << 20, "round limit", 5), (lambda k: (k + 1) << 20, "not converging", 1)],
)
async def test_lying_precopy_info_ends(
    tmp_path: Path, lie: object, stopped: str, rounds: int
) -> None:
    # dirty_bytes that never shrinks (or grows forever), with no data behind it.
    model = SavingModel(stop_copy=200_000, initial=300_000, reported_dirty=lie, seed=9)  # type: ignore[arg-type]
    with devices(saving=model) as pair:
        with trio.fail_after(30):
            async with receiver(tmp_path, pair) as rx:
                report = await send(
                    rx, pair, precopy_options=PrecopyOptions(threshold=10_000, rounds=5)
                )
        phase = report.precopy[f"{IDSTR}/0"]
        assert (phase.stopped, phase.rounds, phase.bytes) == (stopped, rounds, 300_000)
        assert pair.dst.loaded == saved(pair.src) and len(saved(pair.src)) == 500_000
        assert pair.src.state == S.STOP


@pytest.mark.parametrize("receiver_does", ["hang up", "stall"])
async def test_receiver_goes_away_or_stalls_mid_precopy(tmp_path: Path, receiver_does: str) -> None:
    """A control server that answers hello, then takes 1 MiB of precopy data and hangs
    up, or reads everything and never reports anything written (no progress events)."""
    import msgpack

    address = tmp_path / "ctl.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(address))
    listener.listen()

    async def control_peer() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(1 << 16)  # hello
            reply = {"type": "hello", "version": 1, "channels": 1, "devices": [[IDSTR, 0]]}
            await conn.send(msgpack.packb(reply))
            got = 0
            limit = 1 << 20 if receiver_does == "hang up" else 1 << 40
            while got < limit and (data := await conn.recv(1 << 16)):
                got += len(data)

    model = SavingModel(stop_copy=100_000, initial=16 << 20, seed=2)
    options = PrecopyOptions(window=4 << 20, stall=0.5)
    with listener, devices(saving=model) as pair:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(control_peer)
                with pytest.raises(SendError) as info:
                    await send_migration(
                        connect_to=[f"unix:{tmp_path}/data.sock"],
                        channels=1,
                        uuid=UUID,
                        devices=[SendDevice(IDSTR, 0, pair.source)],
                        control=f"unix:{address}",
                        precopy_options=options,
                    )
                nursery.cancel_scope.cancel()
        message = str(info.value)
        if receiver_does == "hang up":
            assert message.startswith(f"{IDSTR}/0: control channel: sending precopy data failed")
        else:  # at most the window went out unwritten
            assert message == (
                f"{IDSTR}/0: receiver wrote no precopy data for 0.5 s (0 of {4 << 20} bytes written)"
            )
            assert pair.source.precopy_bytes <= (4 << 20) + (512 << 10)
        assert pair.src.state == S.RUNNING and pair.src.arcs[-1] == (S.PRE_COPY, S.RUNNING)
        assert 0 < pair.source.precopy_bytes < 16 << 20
        assert_nothing_half_moved(pair)


async def test_receiver_failure_after_switchover_returns_the_source_to_running(
    tmp_path: Path,
) -> None:
    # The destination rejects the stream when it leaves RESUMING: the source had already
    # finished (STOP), and goes back to RUNNING once the receiver reports the failure.
    with devices() as pair:
        pair.dst.stop_errno = errno.EINVAL
        with trio.fail_after(30):
            async with receiver(tmp_path, pair) as rx:
                with pytest.raises(ReceiverFailed) as info:
                    await send(rx, pair, precopy_options=PrecopyOptions(threshold=10_000))
        assert "leaving RESUMING failed" in str(info.value)
        assert pair.src.arcs[-3:] == [
            (S.STOP_COPY, S.STOP),
            (S.STOP, S.RUNNING_P2P),
            (S.RUNNING_P2P, S.RUNNING),
        ]
        assert_nothing_half_moved(pair)
