"""The group/container side of the fake kernel device: ``/dev/vfio/GROUP`` and
``/dev/vfio/vfio``, for kernels without iommufd.

`FakeVfioGroup` wraps a `FakeVfioDevice` (not a cdev) as the only device of a group. Its
`~FakeVfioGroup.ioctl` (a `vfiomig.vfio._uapi.IoctlFn`) answers the container and group
ioctls as ``drivers/vfio/container.c`` and ``group.c`` do, and passes every other fd to
the device's own ioctl:

- on the container (an open fd on `container_path`, a temporary file): GET_API_VERSION
  -> 0; CHECK_EXTENSION -> 1 for the IOMMU types in ``iommu_types`` (type1 and type1v2
  by default, as on a kernel with vfio_iommu_type1; mdev devices use them too; noiommu
  alone for a ``noiommu=True`` group, whose file is named ``noiommu-*``), 0 else;
  SET_IOMMU -> EINVAL without a group in the container or once a model is set, ENODEV
  for a type no driver offers;
- on the group (an open fd on `path`): GET_STATUS -> VIABLE (unless ``viable=False``)
  and CONTAINER_SET once joined; SET_CONTAINER -> EINVAL when already in one or for a
  fd that is not a container, EBADF for a closed fd; GET_DEVICE_FD -> EINVAL until the
  container has an IOMMU model, ENODEV for a name other than ``name``, else a new
  O_CLOEXEC fd on the device (`FakeVfioDevice.open`).

One group fd joins one container (`group_fd` remembers which); closing the group fd is not
seen by the fake (the kernel would take the group out of the container), so a test that
reopens the group uses a new `FakeVfioGroup`.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
import threading
from collections.abc import Iterable

from vfiomig.testing._fake_vfio import FakeVfioDevice, _fd_identity, _oserror
from vfiomig.vfio._uapi import (
    VFIO_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_GET_API_VERSION,
    VFIO_GROUP_FLAGS_CONTAINER_SET,
    VFIO_GROUP_FLAGS_VIABLE,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_NOIOMMU_IOMMU,
    VFIO_SET_IOMMU,
    VFIO_TYPE1_IOMMU,
    VFIO_TYPE1v2_IOMMU,
)

_STATUS = struct.Struct("=II")
_S32 = struct.Struct("=i")


def _temp_file(prefix: str) -> tuple[str, tuple[int, int]]:
    fd, name = tempfile.mkstemp(prefix=prefix)
    os.close(fd)
    st = os.stat(name)
    return name, (st.st_dev, st.st_ino)


class FakeVfioGroup:
    """A VFIO group holding one fake device, and the container it joins; see the module
    docstring. Use as a context manager (or `close`) to remove its files."""

    def __init__(
        self,
        device: FakeVfioDevice,
        *,
        name: str = "00000000-0000-0000-0000-000000000001",
        iommu_types: Iterable[int] | None = None,
        viable: bool = True,
        noiommu: bool = False,
    ) -> None:
        if device.cdev:
            raise ValueError("a group's device is opened through the group, not as a cdev")
        self.device = device
        self.name = name
        if iommu_types is None:
            iommu_types = (
                (VFIO_NOIOMMU_IOMMU,) if noiommu else (VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU)
            )
        self.iommu_types = frozenset(iommu_types)
        self.viable = viable
        # A noiommu group's node is /dev/vfio/noiommu-N: the name is how a user tells.
        self.path, self._group_id = _temp_file("noiommu-" if noiommu else "fake-vfio-group-")
        self.container_path, self._container_id = _temp_file("fake-vfio-container-")
        #: The container fd the group joined, and the IOMMU type that container got.
        self.group_fd: int | None = None
        self.container_fd: int | None = None
        self.iommu_type: int | None = None
        #: Every container/group ioctl, as (request, int argument or None).
        self.calls: list[tuple[int, int | None]] = []
        #: Device fds handed out by GET_DEVICE_FD (the caller owns them).
        self.device_fds: list[int] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        for name in (self.path, self.container_path):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass

    def __enter__(self) -> FakeVfioGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ioctl(self, fd: int, request: int, buf: bytearray | int | None) -> int:
        """`vfiomig.vfio._uapi.IoctlFn`: the group's and container's ioctls; any other fd
        goes to the device."""
        identity = _fd_identity(fd)
        if identity is not None and identity in (self._group_id, self._container_id):
            with self._lock:
                self.calls.append((request, buf if isinstance(buf, int) else None))
                if identity == self._container_id:
                    return self._container_ioctl(fd, request, buf)
                return self._group_ioctl(fd, request, buf)
        return self.device.ioctl(fd, request, buf)

    def _container_ioctl(self, fd: int, request: int, arg: bytearray | int | None) -> int:
        if request == VFIO_GET_API_VERSION:
            return VFIO_API_VERSION
        if request == VFIO_CHECK_EXTENSION and isinstance(arg, int):
            return int(arg in self.iommu_types)
        if request == VFIO_SET_IOMMU and isinstance(arg, int):
            if self.container_fd != fd or self.iommu_type is not None:
                raise _oserror(errno.EINVAL)  # no group in this container, or set already
            if arg not in self.iommu_types:
                raise _oserror(errno.ENODEV)  # no IOMMU driver takes this type
            self.iommu_type = arg
            return 0
        raise _oserror(errno.ENOTTY)

    def _group_ioctl(self, fd: int, request: int, arg: bytearray | int | None) -> int:
        if request == VFIO_GROUP_GET_STATUS and isinstance(arg, bytearray):
            if len(arg) < _STATUS.size or _STATUS.unpack_from(arg)[0] < _STATUS.size:
                raise _oserror(errno.EINVAL)
            flags = VFIO_GROUP_FLAGS_VIABLE if self.viable else 0
            if self.container_fd is not None:
                flags |= VFIO_GROUP_FLAGS_CONTAINER_SET
            _STATUS.pack_into(arg, 0, _STATUS.size, flags)
            return 0
        if request == VFIO_GROUP_SET_CONTAINER and isinstance(arg, bytearray):
            (container,) = _S32.unpack_from(arg)
            identity = _fd_identity(container)
            if identity is None:
                raise _oserror(errno.EBADF)
            if identity != self._container_id or self.container_fd is not None:
                raise _oserror(errno.EINVAL)
            if not self.viable:
                raise _oserror(errno.EPERM)
            self.group_fd, self.container_fd = fd, container
            return 0
        if request == VFIO_GROUP_GET_DEVICE_FD and isinstance(arg, bytearray):
            name = bytes(arg).split(b"\0", 1)[0].decode(errors="replace")
            if self.group_fd != fd or self.iommu_type is None:
                raise _oserror(errno.EINVAL)  # vfio_group_has_iommu: no container model
            if name != self.name:
                raise _oserror(errno.ENODEV)
            device_fd = self.device.open()
            self.device_fds.append(device_fd)
            return device_fd
        raise _oserror(errno.ENOTTY)
