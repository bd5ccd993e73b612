"""The kernel VFIO migration v2 uAPI, as thin as the uAPI itself.

Constants and byte layouts come from ``include/uapi/linux/vfio.h`` (see
``reference/vfio-user-and-uapi.md`` §1). Every function builds the exact buffer with
`struct` and hands it to an *ioctl function* ``ioctl(fd, request, buf) -> int``; the
default, `sys_ioctl`, is ``fcntl.ioctl(fd, request, buf, True)``. Tests and the fake
kernel device (`vfiomig.testing._fake_vfio`) plug in at exactly this level, so nothing above it
knows whether a real driver answered.

Failures are the kernel's: an ``OSError`` carrying its errno escapes unchanged.
"""

from __future__ import annotations

import fcntl
import struct
from collections.abc import Callable
from typing import TypeAlias

from vfiomig._core._migstate import MigState as MigState
from vfiomig._core._migstate import state_name as state_name

#: ``ioctl(fd, request, arg)``: a ``bytearray`` is mutated in place (the kernel writes
#: results back into it); an ``int`` is passed by value (VFIO_CHECK_EXTENSION,
#: VFIO_SET_IOMMU); ``None`` means an ``_IO()`` call without argument (VFIO_DEVICE_RESET).
IoctlFn: TypeAlias = Callable[[int, int, "bytearray | int | None"], int]

# ioctl request numbers: _IO(';', 100 + n), no size encoded, so argsz travels in the buffer.
VFIO_TYPE = 0x3B
VFIO_BASE = 100
# The container (/dev/vfio/vfio) and group (/dev/vfio/N) API, for kernels without iommufd.
VFIO_GET_API_VERSION = 0x3B64  # on the container: VFIO_API_VERSION
VFIO_CHECK_EXTENSION = 0x3B65  # on the container, int arg: > 0 if the IOMMU type is there
VFIO_SET_IOMMU = 0x3B66  # on the container, int arg: the IOMMU type (a group attached first)
VFIO_GROUP_GET_STATUS = 0x3B67  # struct vfio_group_status: argsz, flags
VFIO_GROUP_SET_CONTAINER = 0x3B68  # pointer to the container fd (s32)
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A  # NUL-terminated device name; returns the device fd
VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
VFIO_DEVICE_RESET = 0x3B6F
VFIO_DEVICE_FEATURE = 0x3B75
#: _IO(';', 100 + 18), Linux 6.6+: a device opened from its cdev (/dev/vfio/devices/vfioN)
#: answers EINVAL to every other ioctl until it is bound to an iommufd (/dev/iommu).
VFIO_DEVICE_BIND_IOMMUFD = 0x3B76
#: _IO(';', 100 + 21), on a *data* fd in PRE_COPY or PRE_COPY_P2P only (EINVAL elsewhere).
VFIO_MIG_GET_PRECOPY_INFO = 0x3B79

# struct vfio_device_feature.flags
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18

# feature indexes
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9

# struct vfio_device_feature_migration.flags
VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2


# Layouts: native byte order, as the kernel reads them ("=" has no padding; every field
# below is naturally aligned anyway). Every buffer starts with argsz u32, flags u32.
_FEATURE_U64 = struct.Struct("=IIQ")  # MIGRATION flags, MIG_DATA_SIZE
_FEATURE_MIG_STATE = struct.Struct("=IIIi")  # device_state u32, data_fd s32
#: struct vfio_device_bind_iommufd: argsz, flags (0), iommufd s32, out_devid u32.
_BIND_IOMMUFD = struct.Struct("=IIiI")
#: struct vfio_precopy_info: argsz, flags, initial_bytes u64, dirty_bytes u64.
_PRECOPY_INFO = struct.Struct("=IIQQ")


def sys_ioctl(fd: int, request: int, buf: bytearray | int | None) -> int:
    """The real ioctl: ``fcntl.ioctl`` with the buffer mutated in place (its return value
    is the kernel's, e.g. the new fd of VFIO_GROUP_GET_DEVICE_FD)."""
    if buf is None:
        return int(fcntl.ioctl(fd, request, 0))
    if isinstance(buf, int):
        return int(fcntl.ioctl(fd, request, buf))
    return int(fcntl.ioctl(fd, request, buf, True))


def get_migration_flags(fd: int, *, ioctl: IoctlFn = sys_ioctl) -> int:
    """VFIO_DEVICE_FEATURE GET MIGRATION: the ``VFIO_MIGRATION_*`` bits of the device.

    ENOTTY means the driver has no migration support.
    """
    buf = bytearray(
        _FEATURE_U64.pack(
            _FEATURE_U64.size, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION, 0
        )
    )
    ioctl(fd, VFIO_DEVICE_FEATURE, buf)
    return int(_FEATURE_U64.unpack(buf)[2])


def get_stop_copy_size(fd: int, *, ioctl: IoctlFn = sys_ioctl) -> int:
    """VFIO_DEVICE_FEATURE GET MIG_DATA_SIZE: the driver's estimate of the stop-copy size."""
    buf = bytearray(
        _FEATURE_U64.pack(
            _FEATURE_U64.size, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 0
        )
    )
    ioctl(fd, VFIO_DEVICE_FEATURE, buf)
    return int(_FEATURE_U64.unpack(buf)[2])


def get_state(fd: int, *, ioctl: IoctlFn = sys_ioctl) -> int:
    """VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE: the current ``MigState`` value.

    Returned as a plain int: a newer kernel may report a state this module does not name.
    """
    buf = bytearray(
        _FEATURE_MIG_STATE.pack(
            _FEATURE_MIG_STATE.size,
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            0,
            0,
        )
    )
    ioctl(fd, VFIO_DEVICE_FEATURE, buf)
    return int(_FEATURE_MIG_STATE.unpack(buf)[2])


def set_state(fd: int, state: int, *, ioctl: IoctlFn = sys_ioctl) -> int:
    """VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE: move the device to ``state``.

    The kernel walks multi-step paths itself (RUNNING -> RESUMING passes RUNNING_P2P and
    STOP). Returns the new session's data fd (entering RESUMING, STOP_COPY or PRE_COPY;
    the caller owns it, it is O_CLOEXEC) or -1. On failure the device may be left in any
    intermediate state or in ERROR: read it back with `get_state`.
    """
    buf = bytearray(
        _FEATURE_MIG_STATE.pack(
            _FEATURE_MIG_STATE.size,
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            state,
            -1,
        )
    )
    ioctl(fd, VFIO_DEVICE_FEATURE, buf)
    return int(_FEATURE_MIG_STATE.unpack(buf)[3])


def reset(fd: int, *, ioctl: IoctlFn = sys_ioctl) -> None:
    """VFIO_DEVICE_RESET: the only way out of ERROR and the way to abort RESUMING."""
    ioctl(fd, VFIO_DEVICE_RESET, None)


def bind_iommufd(fd: int, iommufd: int, *, ioctl: IoctlFn = sys_ioctl) -> int:
    """VFIO_DEVICE_BIND_IOMMUFD: give a cdev-opened device fd access; returns the devid.

    Unbound again when the device fd is closed. EINVAL also when the device is already
    open and bound elsewhere (the cdev path allows one user at a time).
    """
    buf = bytearray(_BIND_IOMMUFD.pack(_BIND_IOMMUFD.size, 0, iommufd, 0))
    ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, buf)
    return int(_BIND_IOMMUFD.unpack(buf)[3])


def get_precopy_info(data_fd: int, *, ioctl: IoctlFn = sys_ioctl) -> tuple[int, int]:
    """VFIO_MIG_GET_PRECOPY_INFO on a PRE_COPY data fd: ``(initial_bytes, dirty_bytes)``.

    Both are the driver's estimates of what the data fd can give now: ``initial_bytes``
    shrinks as the initial data is read, ``dirty_bytes`` grows as the running device
    changes its state. EINVAL outside PRE_COPY and PRE_COPY_P2P.
    """
    buf = bytearray(_PRECOPY_INFO.pack(_PRECOPY_INFO.size, 0, 0, 0))
    ioctl(data_fd, VFIO_MIG_GET_PRECOPY_INFO, buf)
    _, _, initial, dirty = _PRECOPY_INFO.unpack(buf)
    return int(initial), int(dirty)


# -- the group/container API ---------------------------------------------------------------

_GROUP_STATUS = struct.Struct("=II")
_S32 = struct.Struct("=i")


def get_api_version(container: int, *, ioctl: IoctlFn = sys_ioctl) -> int:
    """VFIO_GET_API_VERSION on ``/dev/vfio/vfio``: `VFIO_API_VERSION` on every kernel."""
    return ioctl(container, VFIO_GET_API_VERSION, None)


def check_extension(container: int, iommu_type: int, *, ioctl: IoctlFn = sys_ioctl) -> bool:
    """VFIO_CHECK_EXTENSION: whether the container can use ``iommu_type``."""
    return ioctl(container, VFIO_CHECK_EXTENSION, iommu_type) > 0


def set_iommu(container: int, iommu_type: int, *, ioctl: IoctlFn = sys_ioctl) -> None:
    """VFIO_SET_IOMMU: give the container its IOMMU model (after a group joined it)."""
    ioctl(container, VFIO_SET_IOMMU, iommu_type)


def group_status(group: int, *, ioctl: IoctlFn = sys_ioctl) -> int:
    """VFIO_GROUP_GET_STATUS: the ``VFIO_GROUP_FLAGS_*`` bits (VIABLE: every device of
    the group is bound to a VFIO driver or to none)."""
    buf = bytearray(_GROUP_STATUS.pack(_GROUP_STATUS.size, 0))
    ioctl(group, VFIO_GROUP_GET_STATUS, buf)
    return int(_GROUP_STATUS.unpack(buf)[1])


def group_set_container(group: int, container: int, *, ioctl: IoctlFn = sys_ioctl) -> None:
    """VFIO_GROUP_SET_CONTAINER: the group joins the container (unset when the group fd
    closes)."""
    ioctl(group, VFIO_GROUP_SET_CONTAINER, bytearray(_S32.pack(container)))


def group_get_device_fd(group: int, name: str, *, ioctl: IoctlFn = sys_ioctl) -> int:
    """VFIO_GROUP_GET_DEVICE_FD: a new device fd (O_CLOEXEC, the caller owns it) for the
    group's device ``name`` (a PCI address, an mdev uuid). EINVAL until the container has
    an IOMMU model; ENODEV for a name the group does not hold."""
    return ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bytearray(name.encode() + b"\0"))
