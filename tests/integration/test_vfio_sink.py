"""The kernel VFIO sink against the fake kernel device model (and real pipes).

Every test checks that no fd is left open: the autouse fixture compares
/proc/self/fd before and after.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vfiomig._core._errors import SinkError, UsageError
from vfiomig.cli._specs import open_sink
from vfiomig.testing import FakeVfioDevice
from vfiomig.vfio import DataFdSink, VfioSink, open_vfio_sink
from vfiomig.vfio import _sink as _vfio
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import MigState as S

TIMEOUT = 10
RESUME_ARCS = [(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.STOP), (S.STOP, S.RESUMING)]
GET_MIGRATION, GET_STATE, SET_STATE = 0x10001, 0x10002, 0x20002


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = _fds()
    yield
    assert _fds() == before


def stream_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def chunks_of(data: bytes) -> list[bytes | bytearray | memoryview]:
    """The stream in uneven chunks of every accepted type, with an empty one."""
    cut = sorted(min(c, len(data)) for c in (0, 1, 100, 100, 5000, len(data) // 2, len(data)))
    kinds = [bytes, bytearray, memoryview]
    return [kinds[i % 3](data[a:b]) for i, (a, b) in enumerate(itertools.pairwise(cut))]


def sink_for(dev: FakeVfioDevice) -> VfioSink:
    return VfioSink.from_device_fd(dev.open(), owned=True, ioctl=dev.ioctl, write=dev.write)


def state(dev: FakeVfioDevice) -> S:
    return dev.state  # a call, so that mypy does not narrow the attribute across awaits


def feature_calls(dev: FakeVfioDevice) -> list[int | None]:
    return [flags for _, flags in dev.calls]


# -- happy paths ----------------------------------------------------------------------------


async def test_happy_path_walks_the_state_machine() -> None:
    data = stream_of(200_000)
    with trio.fail_after(TIMEOUT), FakeVfioDevice(expected=data) as dev:
        sink = sink_for(dev)
        await sink.start()
        assert state(dev) == S.RESUMING and dev.arcs == RESUME_ARCS
        await sink.write(chunks_of(data))
        assert sink.statistics() == {"written": len(data)}
        await sink.finish()
        assert sink.statistics() == {"written": len(data)}
        await sink.aclose()
        assert dev.loaded == data
        assert dev.state == S.STOP
        assert dev.arcs == [*RESUME_ARCS, (S.RESUMING, S.STOP)]
        assert feature_calls(dev) == [GET_MIGRATION, GET_STATE, SET_STATE, SET_STATE]
        assert dev.data_fd_open_at_stop is False  # closed before SET STOP
        assert dev.resets == 0


def cdev_sink(dev: FakeVfioDevice) -> VfioSink:
    assert dev.iommu_path is not None
    return VfioSink.open(dev.path, ioctl=dev.ioctl, write=dev.write, iommu_path=dev.iommu_path)


async def test_device_cdev_path_is_bound_then_migrated_without_p2p() -> None:
    data = stream_of(10_000)
    flags = uapi.VFIO_MIGRATION_STOP_COPY
    with trio.fail_after(TIMEOUT), FakeVfioDevice(flags=flags, expected=data, cdev=True) as dev:
        sink = cdev_sink(dev)
        assert sink.description == f"vfio:{dev.path}"
        await sink.start()
        assert dev.calls[0] == (uapi.VFIO_DEVICE_BIND_IOMMUFD, None)  # before anything else
        await sink.write([data])
        await sink.finish()
        await sink.aclose()
        await sink.aclose()  # idempotent
        assert dev.arcs == [(S.RUNNING, S.STOP), (S.STOP, S.RESUMING), (S.RESUMING, S.STOP)]
        assert dev.loaded == data


async def test_a_cdev_the_vmm_holds_cannot_be_bound_again() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice(cdev=True) as dev:
        vmm_fd = dev.open()  # open and bound, as the VMM's
        try:
            sink = cdev_sink(dev)
            with pytest.raises(SinkError) as info:
                await sink.start()
            assert info.value.errno == errno.EINVAL
            assert str(info.value) == (
                f"vfio device {dev.path}: binding the device to an iommufd failed:"
                " [Errno 22] Invalid argument (already open elsewhere, e.g. by the VMM:"
                " pass its fd with attach-fd or vfio:fd:N)"
            )
            await sink.abort()
            await sink.aclose()
            assert dev.arcs == [] and dev.resets == 0  # the VMM's device was not touched
        finally:
            os.close(vmm_fd)


def test_fake_cdev_gates_every_ioctl_on_the_bind() -> None:
    with FakeVfioDevice(cdev=True) as dev:
        assert dev.iommu_path is not None
        fd = os.open(dev.path, os.O_RDWR | os.O_CLOEXEC)
        iommufd = os.open(dev.iommu_path, os.O_RDWR | os.O_CLOEXEC)
        other = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(OSError) as info:
                uapi.get_migration_flags(fd, ioctl=dev.ioctl)
            assert info.value.errno == errno.EINVAL  # no access before the bind
            with pytest.raises(OSError) as info:
                uapi.bind_iommufd(fd, other, ioctl=dev.ioctl)
            assert info.value.errno == errno.EBADFD  # not an iommufd
            with pytest.raises(OSError) as info:
                uapi.bind_iommufd(fd, 987_654, ioctl=dev.ioctl)
            assert info.value.errno == errno.EBADF
            assert uapi.bind_iommufd(fd, iommufd, ioctl=dev.ioctl) == 1
            with pytest.raises(OSError) as info:
                uapi.bind_iommufd(fd, iommufd, ioctl=dev.ioctl)
            assert info.value.errno == errno.EINVAL  # bound already
            assert uapi.get_migration_flags(fd, ioctl=dev.ioctl) & uapi.VFIO_MIGRATION_STOP_COPY
        finally:
            for f in (fd, iommufd, other):
                os.close(f)


async def test_starting_from_stop() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice(state=S.STOP, expected=b"abc") as dev:
        sink = sink_for(dev)
        await sink.start()
        await sink.write([b"abc"])
        await sink.finish()
        await sink.aclose()
        assert dev.arcs == [(S.STOP, S.RESUMING), (S.RESUMING, S.STOP)]


async def test_short_writes_are_retried() -> None:
    data = stream_of(5_000)
    with trio.fail_after(TIMEOUT), FakeVfioDevice(expected=data, max_write=7) as dev:
        sink = sink_for(dev)
        await sink.start()
        await sink.write(chunks_of(data))
        await sink.finish()
        await sink.aclose()
        assert dev.loaded == data
        assert max(dev.write_sizes) == 7 and len(dev.write_sizes) >= len(data) // 7


async def test_batches_and_large_chunks_keep_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vfio, "BATCH_BYTES", 1000)
    data = stream_of(30_000)
    chunks = [data[:300], data[300:600], data[600:25_000], data[25_000:]]
    with trio.fail_after(TIMEOUT), FakeVfioDevice(expected=data) as dev:
        sink = sink_for(dev)
        await sink.start()
        await sink.write(chunks)
        await sink.finish()
        await sink.aclose()
        assert dev.loaded == data
        assert max(dev.write_sizes) <= 1000


async def test_nonblocking_data_fd_waits_on_eagain() -> None:
    data = stream_of(300_000)
    fake = FakeVfioDevice(expected=data, nonblocking_data_fd=True, would_block=5)
    with trio.fail_after(TIMEOUT), fake as dev:
        sink = sink_for(dev)
        await sink.start()
        await sink.write(chunks_of(data))
        await sink.finish()
        await sink.aclose()
        assert dev.would_block == 0  # every EAGAIN was seen and waited out
        assert dev.loaded == data


# -- failure paths --------------------------------------------------------------------------


@pytest.mark.parametrize("error_on_failure", [False, True])
async def test_bad_data_at_set_stop_fails_and_resets(error_on_failure: bool) -> None:
    data = stream_of(10_000)
    fake = FakeVfioDevice(expected=data, error_on_failure=error_on_failure)
    with trio.fail_after(TIMEOUT), fake as dev:
        sink = sink_for(dev)
        await sink.start()
        await sink.write([data[:-1]])  # one byte short
        with pytest.raises(SinkError) as info:
            await sink.finish()
        err = info.value
        assert err.errno == errno.EINVAL
        assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.EINVAL
        left = "ERROR" if error_on_failure else "RESUMING"
        assert str(err) == (
            f"vfio device {sink.name}: leaving RESUMING failed: "
            f"[Errno 22] Invalid argument (driver rejected the state; device was in {left}, "
            f"reset)"
        )
        assert dev.resets == 1 and dev.state == S.RUNNING and not dev.session_open
        await sink.abort()  # the loader's abort after a failed finish: nothing left to do
        await sink.aclose()
        assert dev.resets == 1


async def test_driver_errno_at_stop_becomes_the_error() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice(stop_errno=errno.EIO) as dev:
        sink = sink_for(dev)
        await sink.start()
        await sink.write([b"whatever"])
        with pytest.raises(SinkError, match=r"leaving RESUMING failed: \[Errno 5\]") as info:
            await sink.finish()
        assert info.value.errno == errno.EIO
        await sink.aclose()
        assert dev.resets == 1


@pytest.mark.parametrize(
    "code", [errno.ENOMEM, errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV, errno.EFAULT]
)
async def test_write_errno_fails_the_device_and_abort_resets(code: int) -> None:
    data = stream_of(50_000)
    fake = FakeVfioDevice(write_errno_at=(12_345, code), max_write=1000)
    with trio.fail_after(TIMEOUT), fake as dev:
        sink = sink_for(dev)
        await sink.start()
        with pytest.raises(SinkError) as info:
            await sink.write(chunks_of(data))
        assert info.value.errno == code
        assert isinstance(info.value.__cause__, OSError)
        assert f"data fd write failed at byte 12345: [Errno {code}]" in str(info.value)
        assert dev.received == data[:12_345]
        await sink.abort()
        assert dev.resets == 1 and dev.state == S.RUNNING
        await sink.aclose()
        assert dev.resets == 1


async def test_write_after_an_external_reset_is_enodev() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice() as dev:
        sink = sink_for(dev)
        await sink.start()
        other = dev.open()
        uapi.reset(other, ioctl=dev.ioctl)  # someone else reset the device
        os.close(other)
        with pytest.raises(SinkError) as info:
            await sink.write([b"x"])
        assert info.value.errno == errno.ENODEV
        await sink.aclose()


async def test_missing_stop_copy_is_refused_before_any_set() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice(flags=uapi.VFIO_MIGRATION_P2P) as dev:
        sink = sink_for(dev)
        with pytest.raises(SinkError) as info:
            await sink.start()
        assert str(info.value).endswith(": device does not support stop-copy migration (flags 0x2)")
        assert feature_calls(dev) == [GET_MIGRATION]
        await sink.abort()
        await sink.aclose()
        assert dev.resets == 0 and dev.state == S.RUNNING


async def test_no_migration_support_is_enotty() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice(migration=False) as dev:
        sink = sink_for(dev)
        with pytest.raises(SinkError, match="migration not supported by the kernel driver"):
            await sink.start()
        await sink.aclose()


async def test_real_kernel_on_a_non_vfio_path(tmp_path: Path) -> None:
    # The real fcntl.ioctl: a regular file answers ENOTTY to the bind.
    path = str(tmp_path / "not-a-device")
    (tmp_path / "not-a-device").touch()
    (tmp_path / "iommu").touch()
    sink = VfioSink.open(path, iommu_path=str(tmp_path / "iommu"))
    with trio.fail_after(TIMEOUT):
        with pytest.raises(SinkError) as info:
            await sink.start()
        assert info.value.errno == errno.ENOTTY
        assert str(info.value).startswith(
            f"vfio device {path}: binding the device to an iommufd failed: [Errno 25]"
        )
        assert str(info.value).endswith(
            "(not a VFIO device cdev; a group /dev/vfio/N takes vfio:/dev/vfio/N,device=NAME)"
        )
        await sink.abort()
        await sink.aclose()


async def test_real_kernel_on_an_fd_of_a_non_vfio_file(tmp_path: Path) -> None:
    # vfio:fd:N is used as it is (the VMM's fd is bound already): GET MIGRATION -> ENOTTY.
    path = tmp_path / "not-a-device"
    path.touch()
    sink = open_vfio_sink(f"fd:{os.open(path, os.O_RDWR | os.O_CLOEXEC)}")  # the sink owns it
    with trio.fail_after(TIMEOUT):
        with pytest.raises(SinkError) as info:
            await sink.start()
        assert info.value.errno == errno.ENOTTY
        assert "migration not supported by the kernel driver: [Errno 25]" in str(info.value)
        await sink.abort()
        await sink.aclose()


async def test_no_iommufd_is_a_sink_error(tmp_path: Path) -> None:
    with FakeVfioDevice(cdev=True) as dev:
        missing = str(tmp_path / "iommu")
        sink = VfioSink.open(dev.path, ioctl=dev.ioctl, write=dev.write, iommu_path=missing)
        with trio.fail_after(TIMEOUT):
            with pytest.raises(SinkError) as info:
                await sink.start()
            assert info.value.errno == errno.ENOENT
            assert str(info.value).startswith(
                f"vfio device {dev.path}: cannot open {missing} (a device cdev is used"
                " through an iommufd): [Errno 2]"
            )
            await sink.aclose()


async def test_missing_path_is_a_sink_error(tmp_path: Path) -> None:
    sink = open_vfio_sink(str(tmp_path / "nope"))
    with trio.fail_after(TIMEOUT):
        with pytest.raises(SinkError, match="cannot open the device") as info:
            await sink.start()
        assert info.value.errno == errno.ENOENT
        await sink.aclose()


def test_spec_arguments() -> None:
    with pytest.raises(UsageError):
        open_vfio_sink("")
    with pytest.raises(UsageError, match="decimal fd number"):
        open_vfio_sink("fd:x")
    sink = open_vfio_sink("/dev/vfio/devices/vfio0")
    assert isinstance(sink, VfioSink) and sink.description == "vfio:/dev/vfio/devices/vfio0"
    via_registry = open_sink("vfio:fd:7")  # not opened or touched until start()
    assert isinstance(via_registry, VfioSink) and via_registry.description == "vfio:fd 7"


@pytest.mark.parametrize("error_on_failure", [False, True])
async def test_failure_while_entering_resuming(error_on_failure: bool) -> None:
    fake = FakeVfioDevice(
        fail_arcs={(S.RUNNING_P2P, S.STOP): errno.EIO}, error_on_failure=error_on_failure
    )
    with trio.fail_after(TIMEOUT), fake as dev:
        sink = sink_for(dev)
        with pytest.raises(SinkError, match="entering RESUMING failed") as info:
            await sink.start()
        assert info.value.errno == errno.EIO
        if error_on_failure:  # ERROR: only a reset leaves it
            assert dev.resets == 1 and dev.state == S.RUNNING
            assert "device was in ERROR, reset" in str(info.value)
        else:  # stuck half way, no session: left for the VMM
            assert dev.resets == 0 and dev.state == S.RUNNING_P2P
            assert "(device in RUNNING_P2P)" in str(info.value)
        await sink.abort()
        await sink.aclose()
        assert dev.resets == (1 if error_on_failure else 0)


@pytest.mark.parametrize("state", [S.RESUMING, S.ERROR])
async def test_a_device_busy_elsewhere_is_not_touched(state: S) -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice(state=state) as dev:
        sink = sink_for(dev)
        with pytest.raises(SinkError, match=f"device is in {state.name} before the migration"):
            await sink.start()
        await sink.abort()
        await sink.aclose()
        assert dev.resets == 0 and dev.state == state
        assert SET_STATE not in feature_calls(dev)


async def test_abort_resets_an_open_session() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice() as dev:
        sink = sink_for(dev)
        await sink.start()
        await sink.write([b"partial"])
        await sink.abort()
        assert dev.resets == 1 and dev.state == S.RUNNING and not dev.session_open
        await sink.abort()  # idempotent, and never raises
        await sink.aclose()
        assert dev.resets == 1


async def test_abort_resets_even_when_cancelled() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice() as dev:
        sink = sink_for(dev)
        await sink.start()
        with trio.CancelScope() as scope:
            scope.cancel()
            await sink.abort()  # neither skipped nor raising Cancelled
        assert dev.resets == 1 and dev.state == S.RUNNING
        await sink.aclose()


async def test_cancelled_finish_leaves_the_reset_to_aclose() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice() as dev:
        sink = sink_for(dev)
        await sink.start()
        with trio.CancelScope() as scope:
            scope.cancel()
            await sink.finish()
        assert scope.cancelled_caught and state(dev) == S.RESUMING
        await sink.aclose()
        assert dev.resets == 1 and dev.state == S.RUNNING


async def test_aclose_without_finish_resets() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice() as dev:
        sink = sink_for(dev)
        await sink.start()
        await sink.aclose()
        assert dev.resets == 1 and dev.state == S.RUNNING


async def test_abort_never_raises_even_if_reset_fails() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice() as dev:
        sink = sink_for(dev)
        await sink.start()

        calls = []

        def broken(fd: int, request: int, buf: bytearray | int | None) -> int:
            calls.append(request)
            raise OSError(errno.EIO, "gone")

        sink._dev.ioctl = broken  # the device vanished
        await sink.abort()
        await sink.aclose()
        assert calls  # abort went to the device, and its failure stayed inside


async def test_abort_before_start_does_nothing() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice() as dev:
        sink = sink_for(dev)
        await sink.abort()
        await sink.aclose()
        assert dev.calls == []


async def test_borrowed_device_fd_stays_open() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice(expected=b"x") as dev:
        fd = dev.open()
        sink = VfioSink.from_device_fd(fd, ioctl=dev.ioctl, write=dev.write)
        await sink.start()
        await sink.write([b"x"])
        await sink.finish()
        await sink.aclose()
        os.fstat(fd)  # still ours
        os.close(fd)


async def test_start_twice_is_refused() -> None:
    with trio.fail_after(TIMEOUT), FakeVfioDevice() as dev:
        sink = sink_for(dev)
        await sink.start()
        with pytest.raises(SinkError, match="already started"):
            await sink.start()
        await sink.aclose()
        assert dev.resets == 1


# -- a data fd the VMM put in RESUMING ------------------------------------------------------


async def test_data_fd_sink_from_attach_fd() -> None:
    data = stream_of(100_000)
    with trio.fail_after(TIMEOUT), FakeVfioDevice(expected=data, max_write=4096) as dev:
        vmm_fd = dev.open()
        data_fd = uapi.set_state(vmm_fd, S.RESUMING, ioctl=dev.ioctl)  # the VMM's part
        sink = VfioSink.from_data_fd(data_fd, owned=True, write=dev.write)
        assert isinstance(sink, DataFdSink)
        await sink.start()
        await sink.write(chunks_of(data))
        await sink.finish()  # closes the data fd
        uapi.set_state(vmm_fd, S.STOP, ioctl=dev.ioctl)  # the VMM leaves RESUMING
        assert dev.data_fd_open_at_stop is False and dev.loaded == data
        await sink.aclose()
        os.close(vmm_fd)


@pytest.mark.parametrize("blocking", [True, False])
async def test_data_fd_sink_on_a_real_pipe(blocking: bool) -> None:
    # The production write path (os.write) against a real kernel pipe: real short
    # writes and, non-blocking, real EAGAIN; a reader task drains the other end slowly.
    data = stream_of(1_000_000)
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(w, blocking)
    os.set_blocking(r, False)
    got = bytearray()

    async def reader() -> None:
        while True:
            await trio.lowlevel.wait_readable(r)
            chunk = os.read(r, 50_000)
            if not chunk:
                return
            got.extend(chunk)
            await trio.lowlevel.checkpoint()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            sink = DataFdSink(w, owned=True)
            await sink.start()
            await sink.write(chunks_of(data))
            await sink.finish()
            await sink.aclose()
    os.close(r)
    assert bytes(got) == data


async def test_data_fd_sink_borrowed_and_errors() -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)  # writes now fail with EPIPE
    with trio.fail_after(TIMEOUT):
        sink = DataFdSink(w)
        with pytest.raises(SinkError, match="write before start"):
            await sink.write([b"x"])
        await sink.start()
        with pytest.raises(SinkError) as info:
            await sink.write([b"x"])
        assert info.value.errno == errno.EPIPE
        await sink.abort()
        await sink.aclose()
    os.fstat(w)  # borrowed: still open
    os.close(w)


@pytest.mark.parametrize(
    ("case", "code", "note"),
    [
        ("header", errno.EFAULT, "not its device's state?"),
        ("overlong", errno.ENOMEM, "longer than its device's state?"),
    ],
)
async def test_a_driver_that_checks_the_stream_as_it_comes(case: str, code: int, note: str) -> None:
    """As Linux's mtty sample does: EFAULT from the write that completes a header not the
    device's own, ENOMEM from one that would go past the state's size. The device is reset
    (it stays in RESUMING otherwise), and the error says the driver refused the stream."""
    good = stream_of(60)
    data = bytes([good[0] ^ 1]) + good[1:] if case == "header" else good + b"!"
    with FakeVfioDevice(expected=good, header_size=24, stream_limit=60) as dev:
        sink = sink_for(dev)
        with trio.fail_after(TIMEOUT):
            await sink.start()
            with pytest.raises(SinkError) as info:
                await sink.write([data])
            await sink.abort()
            await sink.aclose()
        assert info.value.errno == code
        assert str(info.value).endswith(f"(the driver refused the stream: {note})")
        assert (state(dev), dev.resets, dev.loaded) == (S.RUNNING, 1, None)
