"""A VFIO device fd as the sink and the source hold it: opened, bound, moved.

`DeviceFd` gets the device fd one of three ways: opens a device cdev
(``/dev/vfio/devices/vfioN``) and binds it to a new iommufd before any other ioctl, as the
kernel requires of a cdev; or goes through the group/container API, the only way in on
kernels without iommufd (``/dev/vfio/GROUP`` joins a new container ``/dev/vfio/vfio``,
which gets an IOMMU model, then VFIO_GROUP_GET_DEVICE_FD names the device); or takes a fd
the VMM already has. It reads the migration flags and the state; runs a SET in a worker
thread (a SET can take long: the driver saves, loads or validates state); and closes what
it opened. Errors become the caller's error class with one message shape:
``vfio device NAME: WHAT: CAUSE (NOTE)``, the errno kept.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple, TypeAlias

import trio

from vfiomig._core._errors import SinkError, SourceError, UsageError, VfioMigError
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import IoctlFn

#: The iommufd character device (Linux 6.6+ with CONFIG_IOMMUFD).
IOMMU_PATH = "/dev/iommu"
#: The VFIO container character device of the group/container API (CONFIG_VFIO_CONTAINER).
CONTAINER_PATH = "/dev/vfio/vfio"

#: The caller's error class: `SinkError` or `SourceError` (``cls(message, errno=...)``).
ErrorClass: TypeAlias = "type[SinkError] | type[SourceError]"


class DeviceFd:
    """One device fd; see the module docstring.

    ``path`` with ``group_device`` is a group (``/dev/vfio/GROUP``) and the name of one of
    its devices; ``path`` alone is a device cdev.

    Fd ownership: a fd opened from ``path`` is owned (closed by `close`, which unbinds
    it, or releases the group and the container); a handed-over fd is borrowed unless
    ``owned=True`` transfers it.
    """

    def __init__(
        self,
        *,
        path: str | None,
        fd: int | None,
        owned: bool,
        ioctl: IoctlFn,
        iommu_path: str,
        error: ErrorClass,
        group_device: str | None = None,
        container_path: str = CONTAINER_PATH,
    ) -> None:
        if (path is None) == (fd is None):
            raise ValueError("give exactly one of path and device_fd")
        if group_device is not None and path is None:
            raise ValueError("group_device needs the group's path")
        self.path = path
        self.fd = fd
        self.owned = owned and fd is not None
        self.ioctl = ioctl
        self.iommu_path = iommu_path
        self.group_device = group_device
        self.container_path = container_path
        self.name = path if path is not None else f"fd {fd}"
        if group_device is not None:
            self.name = f"{path},device={group_device}"
        self._iommufd: int | None = None
        self._group: int | None = None
        self._container: int | None = None
        self._error = error

    def error(self, what: str, exc: OSError, note: str | None = None) -> VfioMigError:
        suffix = f" ({note})" if note else ""
        return self._error(f"vfio device {self.name}: {what}: {exc}{suffix}", errno=exc.errno)

    def open(self) -> int:
        """The device fd: opened and bound on first use when built from a path."""
        if self.fd is None and self.group_device is not None:
            self.fd = self._open_from_group(self.group_device)
            self.owned = True
        if self.fd is None:
            assert self.path is not None
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise self.error("cannot open the device", exc) from exc
            self.owned = True
            self._bind(self.fd)
        return self.fd

    def _bind(self, fd: int) -> None:
        """VFIO_DEVICE_BIND_IOMMUFD on a device we opened from its path (a cdev)."""
        try:
            self._iommufd = os.open(self.iommu_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self.error(
                f"cannot open {self.iommu_path} (a device cdev is used through an iommufd)", exc
            ) from exc
        try:
            uapi.bind_iommufd(fd, self._iommufd, ioctl=self.ioctl)
        except OSError as exc:
            note = {
                errno.ENOTTY: "not a VFIO device cdev; a group /dev/vfio/N takes"
                " vfio:/dev/vfio/N,device=NAME",
                errno.EINVAL: "already open elsewhere, e.g. by the VMM: pass its fd with"
                " attach-fd or vfio:fd:N",
            }.get(exc.errno or 0)
            raise self.error("binding the device to an iommufd failed", exc, note) from exc

    def _open_from_group(self, name: str) -> int:
        """The group/container API: a new container, the group in it with an IOMMU model,
        then the device fd of ``name``. The group and container fds stay open (and owned)
        until `close`: closing the group would take the container from under the device.
        """
        assert self.path is not None
        try:
            self._container = os.open(self.container_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self.error(
                f"cannot open the VFIO container {self.container_path}", exc, _CONTAINER_HINT
            ) from exc
        container, ioctl = self._container, self.ioctl
        try:
            version = uapi.get_api_version(container, ioctl=ioctl)
        except OSError as exc:
            raise self.error(f"{self.container_path} is not a VFIO container", exc) from exc
        if version != uapi.VFIO_API_VERSION:
            raise self._error(
                f"vfio device {self.name}: VFIO API version {version} "
                f"(expected {uapi.VFIO_API_VERSION})"
            )
        try:
            self._group = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            note = {
                errno.EBUSY: "the group is open elsewhere, e.g. by the VMM: pass its device"
                " fd with attach-fd or vfio:fd:N",
                errno.ENOENT: "no such VFIO group: see /sys/kernel/iommu_groups",
            }.get(exc.errno or 0)
            raise self.error("cannot open the group", exc, note) from exc
        group = self._group
        try:
            status = uapi.group_status(group, ioctl=ioctl)
        except OSError as exc:
            raise self.error("reading the group status failed (not a VFIO group?)", exc) from exc
        if not status & uapi.VFIO_GROUP_FLAGS_VIABLE:
            raise self._error(
                f"vfio device {self.name}: group not viable: every device in it must be "
                "bound to a VFIO driver or to none"
            )
        try:
            uapi.group_set_container(group, container, ioctl=ioctl)
        except OSError as exc:
            raise self.error("attaching the group to a container failed", exc) from exc
        iommu_type = self._iommu_type(container)
        try:
            uapi.set_iommu(container, iommu_type, ioctl=ioctl)
        except OSError as exc:
            raise self.error(f"setting IOMMU type {iommu_type} failed", exc) from exc
        try:
            return uapi.group_get_device_fd(group, name, ioctl=ioctl)
        except OSError as exc:
            note = {errno.ENODEV: f"the group holds no device {name!r}"}.get(exc.errno or 0)
            raise self.error("getting the device fd from the group failed", exc, note) from exc

    def _iommu_type(self, container: int) -> int:
        """noiommu for a ``noiommu-N`` group; else type1v2 or type1 (mdev devices use type1
        too: their emulated IOMMU needs no hardware)."""
        assert self.path is not None
        if os.path.basename(self.path).startswith("noiommu-"):
            return uapi.VFIO_NOIOMMU_IOMMU
        for kind in (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_IOMMU):
            try:
                if uapi.check_extension(container, kind, ioctl=self.ioctl):
                    return kind
            except OSError as exc:
                raise self.error("VFIO_CHECK_EXTENSION failed", exc) from exc
        raise self._error(
            f"vfio device {self.name}: the container offers no type1 IOMMU "
            "(modprobe vfio_iommu_type1)"
        )

    def migration_flags(self) -> int:
        """GET MIGRATION on the open device: its ``VFIO_MIGRATION_*`` bits (STOP_COPY
        required, as for every migration driver)."""
        assert self.fd is not None
        try:
            flags = uapi.get_migration_flags(self.fd, ioctl=self.ioctl)
        except OSError as exc:
            if exc.errno == errno.ENOTTY:
                raise self.error("migration not supported by the kernel driver", exc) from exc
            raise self.error("reading the migration flags failed", exc) from exc
        if not flags & uapi.VFIO_MIGRATION_STOP_COPY:
            raise self._error(
                f"vfio device {self.name}: device does not support stop-copy migration "
                f"(flags {flags:#x})"
            )
        return flags

    def state(self) -> int:
        """GET MIG_DEVICE_STATE, failures as the caller's error."""
        assert self.fd is not None
        try:
            return uapi.get_state(self.fd, ioctl=self.ioctl)
        except OSError as exc:
            raise self.error("reading the device state failed", exc) from exc

    async def set_state(self, state: int) -> int:
        """SET MIG_DEVICE_STATE in a worker thread; returns the new data fd or -1.

        Never abandoned on cancel: a data fd it returns must reach the caller, or it would
        leak. OSError escapes unchanged (the caller knows what it was doing).
        """
        fd, ioctl = self.fd, self.ioctl
        assert fd is not None
        return await trio.to_thread.run_sync(lambda: uapi.set_state(fd, state, ioctl=ioctl))

    def close(self) -> None:
        """Close the device fd if owned (that unbinds it) and the iommufd. Idempotent."""
        if self.owned and self.fd is not None:
            self.owned = False
            os.close(self.fd)
        for attr in ("_iommufd", "_group", "_container"):  # the device's first
            extra = getattr(self, attr)
            if extra is not None:
                setattr(self, attr, None)
                os.close(extra)


_CONTAINER_HINT = "the group/container API needs CONFIG_VFIO_CONTAINER and modprobe vfio"


class DeviceSpec(NamedTuple):
    """A parsed ``vfio:`` spec: exactly one of ``path`` and ``fd``; ``group_device`` with
    a group path."""

    path: str | None
    fd: int | None
    group_device: str | None = None


def parse_spec(what: str, arg: str) -> DeviceSpec:
    """The text after ``vfio:`` in a ``what`` (sink or source) spec: ``PATH`` (a device
    cdev), ``/dev/vfio/GROUP,device=NAME`` (a device of a group, opened through the
    container API) or ``fd:N`` (an inherited device fd)."""
    if arg.startswith("fd:"):
        text = arg[3:]
        if not text.isdecimal():
            raise UsageError(f"{what} 'vfio:{arg}' needs a decimal fd number, got {text!r}")
        return DeviceSpec(None, int(text))
    if "," in arg:
        path, _, option = arg.partition(",")
        key, _, name = option.partition("=")
        if key != "device" or not name or not path:
            raise UsageError(
                f"{what} 'vfio:{arg}': expected vfio:/dev/vfio/GROUP,device=NAME "
                f"(NAME: the group's device, e.g. a PCI address or an mdev uuid)"
            )
        return DeviceSpec(path, None, name)
    if not arg:
        raise UsageError(
            f"{what} 'vfio:' needs a device (vfio:PATH, vfio:/dev/vfio/GROUP,device=NAME"
            " or vfio:fd:N"
            + (
                "; attach: takes the fd from the control channel's attach-fd)"
                if what == "sink"
                else ")"
            )
        )
    return DeviceSpec(arg, None)
