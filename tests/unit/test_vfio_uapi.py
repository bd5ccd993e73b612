"""The thin ioctl layer: request numbers, flags and the exact bytes of every buffer.

Expected values are the ones in reference/vfio-user-and-uapi.md §1.1-§1.4, written out
literally (not recomputed with the module's own structs).
"""

from __future__ import annotations

import errno
import struct
import sys
import tempfile

import pytest

from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import MigState

LITTLE = sys.byteorder == "little"


class Recorder:
    """An ioctl function that records (fd, request, bytes in) and writes a reply."""

    def __init__(self, reply: dict[int, bytes] | None = None) -> None:
        self.calls: list[tuple[int, int, bytes | int | None]] = []
        self.reply = reply or {}  # offset -> bytes written back into the buffer

    def __call__(self, fd: int, request: int, buf: bytearray | int | None) -> int:
        self.calls.append((fd, request, buf if buf is None or isinstance(buf, int) else bytes(buf)))
        if isinstance(buf, bytearray):
            for off, data in self.reply.items():
                buf[off : off + len(data)] = data
        return 0


def test_request_numbers() -> None:
    assert uapi.VFIO_DEVICE_FEATURE == 0x3B75 == (0x3B << 8) | (100 + 17)
    assert uapi.VFIO_DEVICE_RESET == 0x3B6F == (0x3B << 8) | (100 + 11)
    assert uapi.VFIO_MIG_GET_PRECOPY_INFO == 0x3B79 == (0x3B << 8) | (100 + 21)


def test_feature_flags_and_indexes() -> None:
    assert uapi.VFIO_DEVICE_FEATURE_MASK == 0xFFFF
    assert uapi.VFIO_DEVICE_FEATURE_GET == 0x10000
    assert uapi.VFIO_DEVICE_FEATURE_SET == 0x20000
    assert uapi.VFIO_DEVICE_FEATURE_PROBE == 0x40000
    assert uapi.VFIO_DEVICE_FEATURE_MIGRATION == 1
    assert uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE == 2
    assert uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE == 9
    assert (uapi.VFIO_MIGRATION_STOP_COPY, uapi.VFIO_MIGRATION_P2P) == (1, 2)
    assert uapi.VFIO_MIGRATION_PRE_COPY == 4


def test_mig_state_values() -> None:
    assert {s.name: int(s) for s in MigState} == {
        "ERROR": 0,
        "STOP": 1,
        "RUNNING": 2,
        "STOP_COPY": 3,
        "RESUMING": 4,
        "RUNNING_P2P": 5,
        "PRE_COPY": 6,
        "PRE_COPY_P2P": 7,
    }
    assert uapi.state_name(4) == "RESUMING"
    assert uapi.state_name(99) == "99"


def test_get_migration_flags_buffer() -> None:
    rec = Recorder({8: struct.pack("=Q", 0x7)})
    assert uapi.get_migration_flags(5, ioctl=rec) == 0x7
    assert rec.calls == [(5, 0x3B75, struct.pack("=IIQ", 16, 0x10001, 0))]
    if LITTLE:
        assert rec.calls[0][2] == bytes.fromhex("10000000 01000100 0000000000000000")


def test_get_state_buffer() -> None:
    rec = Recorder({8: struct.pack("=I", 4), 12: struct.pack("=i", -1)})
    assert uapi.get_state(3, ioctl=rec) == MigState.RESUMING
    assert rec.calls == [(3, 0x3B75, struct.pack("=IIIi", 16, 0x10002, 0, 0))]
    if LITTLE:
        assert rec.calls[0][2] == bytes.fromhex("10000000 02000100 00000000 00000000")


def test_set_state_buffer_and_data_fd() -> None:
    rec = Recorder({12: struct.pack("=i", 42)})
    assert uapi.set_state(3, MigState.RESUMING, ioctl=rec) == 42
    assert rec.calls == [(3, 0x3B75, struct.pack("=IIIi", 16, 0x20002, 4, -1))]
    if LITTLE:
        assert rec.calls[0][2] == bytes.fromhex("10000000 02000200 04000000 ffffffff")


def test_set_state_without_new_session_returns_minus_one() -> None:
    rec = Recorder()  # the kernel leaves data_fd at -1
    assert uapi.set_state(3, MigState.STOP, ioctl=rec) == -1
    assert rec.calls[0][2] == struct.pack("=IIIi", 16, 0x20002, 1, -1)


def test_stop_copy_size_buffer() -> None:
    rec = Recorder({8: struct.pack("=Q", 1 << 33)})
    assert uapi.get_stop_copy_size(3, ioctl=rec) == 1 << 33
    assert rec.calls == [(3, 0x3B75, struct.pack("=IIQ", 16, 0x10009, 0))]


def test_precopy_info_buffer() -> None:
    rec = Recorder({8: struct.pack("=QQ", 1 << 20, 4096)})
    assert uapi.get_precopy_info(7, ioctl=rec) == (1 << 20, 4096)
    assert rec.calls == [(7, 0x3B79, struct.pack("=IIQQ", 24, 0, 0, 0))]
    if LITTLE:
        assert rec.calls[0][2] == bytes.fromhex("18000000 00000000" + "00" * 16)


def test_reset_has_no_argument() -> None:
    rec = Recorder()
    uapi.reset(9, ioctl=rec)
    assert rec.calls == [(9, 0x3B6F, None)]


def test_oserror_escapes_unchanged() -> None:
    def failing(fd: int, request: int, buf: bytearray | int | None) -> int:
        raise OSError(errno.EINVAL, "bad")

    with pytest.raises(OSError) as info:
        uapi.set_state(3, MigState.STOP, ioctl=failing)
    assert info.value.errno == errno.EINVAL


def test_real_ioctl_on_a_non_vfio_file_is_enotty() -> None:
    # The real fcntl.ioctl path, answered by the real kernel: a regular file knows no
    # VFIO ioctl. This is what a "vfio:" sink pointed at a wrong path reports.
    with tempfile.TemporaryFile() as f:
        for call in (uapi.get_migration_flags, uapi.get_state, uapi.reset):
            with pytest.raises(OSError) as info:
                call(f.fileno())
            assert info.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as info:
            uapi.set_state(f.fileno(), MigState.STOP)
        assert info.value.errno == errno.ENOTTY
