"""A VFIO device fd as the sink and the source hold it: opened, bound, moved.

`DeviceFd` opens a device cdev (``/dev/vfio/devices/vfioN``) and binds it to a new
iommufd before any other ioctl, as the kernel requires of a cdev, or takes a fd the VMM
already has; reads the migration flags and the state; runs a SET in a worker thread (a
SET can take long: the driver saves, loads or validates state); and closes what it
opened. Errors become the caller's error class with one message shape:
``vfio device NAME: WHAT: CAUSE (NOTE)``, the errno kept.
"""

from __future__ import annotations

import errno
import os
from typing import TypeAlias

import trio

from vfiomig._core._errors import SinkError, SourceError, UsageError, VfioMigError
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import IoctlFn

#: The iommufd character device (Linux 6.6+ with CONFIG_IOMMUFD).
IOMMU_PATH = "/dev/iommu"

#: The caller's error class: `SinkError` or `SourceError` (``cls(message, errno=...)``).
ErrorClass: TypeAlias = "type[SinkError] | type[SourceError]"


class DeviceFd:
    """One device fd; see the module docstring.

    Fd ownership: a fd opened from ``path`` is owned (closed by `close`, which unbinds
    it); a handed-over fd is borrowed unless ``owned=True`` transfers it.
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
    ) -> None:
        if (path is None) == (fd is None):
            raise ValueError("give exactly one of path and device_fd")
        self.path = path
        self.fd = fd
        self.owned = owned and fd is not None
        self.ioctl = ioctl
        self.iommu_path = iommu_path
        self.name = path if path is not None else f"fd {fd}"
        self._iommufd: int | None = None
        self._error = error

    def error(self, what: str, exc: OSError, note: str | None = None) -> VfioMigError:
        suffix = f" ({note})" if note else ""
        return self._error(f"vfio device {self.name}: {what}: {exc}{suffix}", errno=exc.errno)

    def open(self) -> int:
        """The device fd: opened and bound on first use when built from a path."""
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
                errno.ENOTTY: "not a VFIO device cdev",
                errno.EINVAL: "already open elsewhere, e.g. by the VMM: pass its fd with"
                " attach-fd or vfio:fd:N",
            }.get(exc.errno or 0)
            raise self.error("binding the device to an iommufd failed", exc, note) from exc

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
        if self._iommufd is not None:
            os.close(self._iommufd)
            self._iommufd = None


def parse_spec(what: str, arg: str) -> tuple[str | None, int | None]:
    """The text after ``vfio:`` in a ``what`` (sink or source) spec: ``PATH`` -> (path,
    None); ``fd:N`` -> (None, N), an inherited device fd."""
    if arg.startswith("fd:"):
        text = arg[3:]
        if not text.isdecimal():
            raise UsageError(f"{what} 'vfio:{arg}' needs a decimal fd number, got {text!r}")
        return None, int(text)
    if not arg:
        raise UsageError(
            f"{what} 'vfio:' needs a device path (vfio:PATH or vfio:fd:N"
            + (
                "; attach: takes the fd from the control channel's attach-fd)"
                if what == "sink"
                else ")"
            )
        )
    return arg, None
