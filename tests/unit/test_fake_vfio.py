"""The fake kernel device model: the kernel's FSM paths, the core's checks, its errnos."""

from __future__ import annotations

import errno
import os
import struct
import tempfile

import pytest

from vfiomig.testing._fake_fsm import next_state, path
from vfiomig.testing._fake_vfio import FakeVfioDevice
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import MigState as S

ALL = uapi.VFIO_MIGRATION_STOP_COPY | uapi.VFIO_MIGRATION_P2P | uapi.VFIO_MIGRATION_PRE_COPY
ONLY_STOP_COPY = uapi.VFIO_MIGRATION_STOP_COPY

# The combination transitions listed in vfio_mig_get_next_state's comment, for a device
# with every optional feature.
KERNEL_PATHS = """
PRE_COPY PRE_COPY_P2P STOP_COPY
PRE_COPY RUNNING RUNNING_P2P
PRE_COPY RUNNING RUNNING_P2P STOP
PRE_COPY RUNNING RUNNING_P2P STOP RESUMING
PRE_COPY_P2P RUNNING_P2P RUNNING
PRE_COPY_P2P RUNNING_P2P STOP
PRE_COPY_P2P RUNNING_P2P STOP RESUMING
RESUMING STOP RUNNING_P2P
RESUMING STOP RUNNING_P2P PRE_COPY_P2P
RESUMING STOP RUNNING_P2P RUNNING
RESUMING STOP RUNNING_P2P RUNNING PRE_COPY
RESUMING STOP STOP_COPY
RUNNING RUNNING_P2P PRE_COPY_P2P
RUNNING RUNNING_P2P STOP
RUNNING RUNNING_P2P STOP RESUMING
RUNNING RUNNING_P2P STOP STOP_COPY
RUNNING_P2P RUNNING PRE_COPY
RUNNING_P2P STOP RESUMING
RUNNING_P2P STOP STOP_COPY
STOP RUNNING_P2P PRE_COPY_P2P
STOP RUNNING_P2P RUNNING
STOP RUNNING_P2P RUNNING PRE_COPY
STOP_COPY STOP RESUMING
STOP_COPY STOP RUNNING_P2P
STOP_COPY STOP RUNNING_P2P RUNNING
"""

DIRECT_ARCS = [
    (S.RUNNING_P2P, S.STOP),
    (S.STOP_COPY, S.STOP),
    (S.RESUMING, S.STOP),
    (S.PRE_COPY, S.RUNNING),
    (S.RUNNING_P2P, S.RUNNING),
    (S.PRE_COPY_P2P, S.RUNNING_P2P),
    (S.RUNNING, S.RUNNING_P2P),
    (S.STOP, S.RUNNING_P2P),
    (S.RUNNING, S.PRE_COPY),
    (S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.STOP, S.STOP_COPY),
    (S.PRE_COPY, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.PRE_COPY),
    (S.PRE_COPY_P2P, S.STOP_COPY),
    (S.STOP, S.RESUMING),
]


@pytest.mark.parametrize("line", KERNEL_PATHS.split("\n")[1:-1])
def test_combination_paths_match_the_kernel(line: str) -> None:
    states = [S[name] for name in line.split()]
    assert path(states[0], states[-1], ALL) == states[1:]


@pytest.mark.parametrize(("cur", "new"), DIRECT_ARCS)
def test_direct_arcs_are_one_step(cur: S, new: S) -> None:
    assert next_state(cur, new, ALL) == new


def test_without_p2p_the_kernel_skips_running_p2p() -> None:
    assert path(S.RUNNING, S.RESUMING, ONLY_STOP_COPY) == [S.STOP, S.RESUMING]
    assert path(S.RESUMING, S.RUNNING, ONLY_STOP_COPY) == [S.STOP, S.RUNNING]
    assert next_state(S.RUNNING, S.RUNNING_P2P, ONLY_STOP_COPY) is None


def test_blocked_and_invalid_requests() -> None:
    assert next_state(S.STOP_COPY, S.PRE_COPY, ALL) is None
    assert next_state(S.STOP_COPY, S.PRE_COPY_P2P, ALL) is None
    assert next_state(S.RUNNING, S.ERROR, ALL) is None
    assert next_state(S.ERROR, S.RUNNING, ALL) is None
    assert next_state(S.RUNNING, 8, ALL) is None
    assert next_state(S.RUNNING, S.PRE_COPY, ONLY_STOP_COPY) is None


def feature(flags: int, payload: bytes) -> bytearray:
    return bytearray(struct.pack("=II", 8 + len(payload), flags) + payload)


def errno_of(dev: FakeVfioDevice, fd: int, buf: bytearray | None, request: int = 0x3B75) -> int:
    with pytest.raises(OSError) as info:
        dev.ioctl(fd, request, buf)
    assert info.value.errno is not None
    return info.value.errno


def test_core_checks_in_order() -> None:
    with FakeVfioDevice() as dev:
        fd = dev.open()
        try:
            short = bytearray(struct.pack("=IIQ", 4, 0x10001, 0))
            assert errno_of(dev, fd, short) == errno.EINVAL  # argsz < 8
            assert errno_of(dev, fd, feature(0x80001, bytes(8))) == errno.EINVAL  # bit 19
            assert errno_of(dev, fd, feature(0x30002, bytes(8))) == errno.EINVAL  # GET|SET
            assert errno_of(dev, fd, feature(0x20001, bytes(8))) == errno.EINVAL  # SET flags
            assert errno_of(dev, fd, feature(0x00001, bytes(8))) == errno.EINVAL  # no op
            assert errno_of(dev, fd, feature(0x10002, bytes(4))) == errno.EINVAL  # short
            assert errno_of(dev, fd, feature(0x10063, bytes(8))) == errno.EINVAL  # feature 99
            assert errno_of(dev, fd, None, request=0x3B6B) == errno.ENOTTY
            assert dev.ioctl(fd, 0x3B75, feature(0x50001, b"")) == 0  # PROBE GET MIGRATION
            assert dev.ioctl(fd, 0x3B75, feature(0x70002, b"")) == 0  # PROBE GET|SET
        finally:
            os.close(fd)


def test_no_migration_is_enotty_and_foreign_fd_is_enotty() -> None:
    with FakeVfioDevice(migration=False) as dev, tempfile.TemporaryFile() as other:
        fd = dev.open()
        try:
            assert errno_of(dev, fd, feature(0x10001, bytes(8))) == errno.ENOTTY
            assert errno_of(dev, fd, feature(0x20002, struct.pack("=Ii", 4, -1))) == errno.ENOTTY
            assert errno_of(dev, other.fileno(), feature(0x10001, bytes(8))) == errno.ENOTTY
        finally:
            os.close(fd)


def test_resuming_session_error_state_and_reset() -> None:
    stream = b"state" * 1000
    with FakeVfioDevice(expected=stream, error_on_failure=True) as dev:
        fd = dev.open()
        try:
            data_fd = uapi.set_state(fd, S.RESUMING, ioctl=dev.ioctl)
            assert data_fd >= 0 and os.get_blocking(data_fd)
            assert dev.arcs == [
                (S.RUNNING, S.RUNNING_P2P),
                (S.RUNNING_P2P, S.STOP),
                (S.STOP, S.RESUMING),
            ]
            assert uapi.set_state(fd, S.RESUMING, ioctl=dev.ioctl) == -1  # already there
            assert dev.write(data_fd, memoryview(stream[:10])) == 10
            os.close(data_fd)
            with pytest.raises(OSError) as info:
                uapi.set_state(fd, S.STOP, ioctl=dev.ioctl)  # 10 of 5000 bytes: invalid
            assert info.value.errno == errno.EINVAL
            assert uapi.get_state(fd, ioctl=dev.ioctl) == S.ERROR
            with pytest.raises(OSError) as info:
                uapi.set_state(fd, S.RUNNING, ioctl=dev.ioctl)  # only a reset leaves ERROR
            assert info.value.errno == errno.EINVAL
            uapi.reset(fd, ioctl=dev.ioctl)
            assert uapi.get_state(fd, ioctl=dev.ioctl) == S.RUNNING
            assert not dev.session_open and dev.resets == 1
        finally:
            os.close(fd)


def test_write_to_an_ended_session_is_enodev() -> None:
    with FakeVfioDevice() as dev:
        fd = dev.open()
        data_fd = uapi.set_state(fd, S.RESUMING, ioctl=dev.ioctl)
        try:
            uapi.reset(fd, ioctl=dev.ioctl)
            with pytest.raises(OSError) as info:
                dev.write(data_fd, memoryview(b"x"))
            assert info.value.errno == errno.ENODEV
        finally:
            os.close(data_fd)
            os.close(fd)


def test_write_faults() -> None:
    with FakeVfioDevice(max_write=3, write_errno_at=(7, errno.ENOMEM)) as dev:
        fd = dev.open()
        data_fd = uapi.set_state(fd, S.RESUMING, ioctl=dev.ioctl)
        try:
            data = memoryview(b"abcdefghij")
            assert [dev.write(data_fd, data[i:]) for i in (0, 3, 6)] == [3, 3, 1]
            with pytest.raises(OSError) as info:
                dev.write(data_fd, data[7:])
            assert info.value.errno == errno.ENOMEM
            assert dev.received == b"abcdefg"
        finally:
            os.close(data_fd)
            os.close(fd)


def test_saving_states_return_a_read_fd() -> None:
    with FakeVfioDevice(flags=ALL) as dev:
        fd = dev.open()
        try:
            read_fd = uapi.set_state(fd, S.STOP_COPY, ioctl=dev.ioctl)
            assert read_fd >= 0 and os.read(read_fd, 10) == b""
            os.close(read_fd)
            assert dev.arcs[-1] == (S.STOP, S.STOP_COPY)
            with pytest.raises(OSError):
                uapi.set_state(fd, S.PRE_COPY, ioctl=dev.ioctl)
            assert dev.state == S.STOP_COPY
        finally:
            os.close(fd)


def test_precopy_info_and_reads_follow_the_model() -> None:
    from vfiomig.testing._fake_saving import SavingModel

    model = SavingModel(stop_copy=7, initial=10, dirty=[4], seed=1)
    with FakeVfioDevice(flags=ALL, saving=model) as dev:
        fd = dev.open()
        try:
            with pytest.raises(OSError) as info:  # on the device fd: not a data fd
                uapi.get_precopy_info(fd, ioctl=dev.ioctl)
            assert info.value.errno == errno.ENOTTY
            data_fd = uapi.set_state(fd, S.PRE_COPY, ioctl=dev.ioctl)
            assert uapi.get_precopy_info(data_fd, ioctl=dev.ioctl) == (10, 0)
            assert len(dev.read(data_fd, 6)) == 6
            assert uapi.get_precopy_info(data_fd, ioctl=dev.ioctl) == (4, 4)  # dirtied 4
            assert len(dev.read(data_fd, 100)) == 8
            with pytest.raises(OSError) as info:  # the temporary end of PRE_COPY data
                dev.read(data_fd, 100)
            assert info.value.errno == errno.ENOMSG
            # A short argsz is EINVAL (the driver's minsz check).
            short = bytearray(struct.pack("=IIQQ", 16, 0, 0, 0))
            with pytest.raises(OSError) as info:
                dev.ioctl(data_fd, uapi.VFIO_MIG_GET_PRECOPY_INFO, short)
            assert info.value.errno == errno.EINVAL
            # PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keeps the fd; the info is EINVAL there.
            assert uapi.set_state(fd, S.STOP_COPY, ioctl=dev.ioctl) == -1
            with pytest.raises(OSError) as info:
                uapi.get_precopy_info(data_fd, ioctl=dev.ioctl)
            assert info.value.errno == errno.EINVAL
            assert len(dev.read(data_fd, 100)) == 7 and dev.read(data_fd, 100) == b""
            uapi.set_state(fd, S.STOP, ioctl=dev.ioctl)
            with pytest.raises(OSError) as info:  # the session ended
                dev.read(data_fd, 1)
            assert info.value.errno == errno.ENODEV
            assert dev.saving_session is not None and len(dev.saving_session.saved) == 21
            os.close(data_fd)
        finally:
            os.close(fd)


def test_saving_faults_and_a_lying_precopy_info() -> None:
    from vfiomig.testing._fake_saving import SavingModel

    model = SavingModel(stop_copy=100, max_read=30, read_errno_at=(70, errno.EIO))
    with FakeVfioDevice(saving=model) as dev:
        fd = dev.open()
        data_fd = uapi.set_state(fd, S.STOP_COPY, ioctl=dev.ioctl)
        assert [len(dev.read(data_fd, 100)) for _ in range(3)] == [30, 30, 10]
        with pytest.raises(OSError) as info:
            dev.read(data_fd, 100)
        assert info.value.errno == errno.EIO
        os.close(data_fd)
        os.close(fd)
    lying = SavingModel(initial=5, reported_dirty=lambda k: 1000 * k)
    with FakeVfioDevice(flags=ALL, saving=lying) as dev:
        fd = dev.open()
        data_fd = uapi.set_state(fd, S.PRE_COPY, ioctl=dev.ioctl)
        assert [uapi.get_precopy_info(data_fd, ioctl=dev.ioctl)[1] for _ in range(3)] == [
            0,
            1000,
            2000,
        ]
        assert len(dev.read(data_fd, 100)) == 5  # no data behind the lie
        os.close(data_fd)
        os.close(fd)
