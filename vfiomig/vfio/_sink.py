"""The kernel VFIO sink: load one device's state through the migration v2 uAPI.

`VfioSink` drives the device fd: GET MIGRATION (STOP_COPY required), SET RESUMING (the
kernel walks RUNNING -> RUNNING_P2P -> STOP -> RESUMING itself) and keeps the data fd it
returns, writes the stream to that fd looping on short writes, then closes the data fd
and SETs STOP, where the driver validates the stream; the driver's errno becomes the
device's error. On any failure after RESUMING was entered the device is read back and
reset (VFIO_DEVICE_RESET is the only way to abort RESUMING or leave ERROR).

`DataFdSink` only writes a data fd that the VMM already put in RESUMING (``attach-fd``
with kind ``data``); entering and leaving RESUMING, and the reset, are the VMM's job.

Fd ownership: a sink closes the fds it opened (the device path, every data fd a SET
returned). A fd handed to a constructor is borrowed unless ``owned=True`` transfers it
(for a fd received with SCM_RIGHTS the receiver holds its own copy: pass ``owned=True``).

The uAPI calls go through an injectable ``ioctl`` function and the data fd writes
through an injectable ``write`` function (``os.write``); `vfiomig.testing._fake_vfio` provides
both for tests.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import TypeAlias

import trio

from vfiomig._core._errors import SinkError
from vfiomig.sinks import Chunk, Sink
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._device import CONTAINER_PATH, IOMMU_PATH, DeviceFd, parse_spec
from vfiomig.vfio._uapi import IoctlFn, MigState, state_name

#: ``write(fd, data) -> count``, as ``os.write``.
WriteFn: TypeAlias = Callable[[int, memoryview], int]

#: Bytes handed to one worker-thread call for a blocking data fd: large enough that the
#: thread hop is amortised, small enough that a cancel is seen within one batch.
BATCH_BYTES = 4 << 20


class _DataFd:
    """A data fd and the write loop: every byte, in order, short writes retried.

    A blocking fd (the kernel's default) is written from a worker thread, one batch of
    up to `BATCH_BYTES` per hop; a non-blocking fd is written from the event loop,
    waiting for writability on EAGAIN.
    """

    def __init__(self, fd: int, write: WriteFn, *, owned: bool) -> None:
        self.fd = fd
        self.owned = owned
        self.written = 0
        self._write = write
        self._blocking = os.get_blocking(fd)

    async def write(self, chunks: Sequence[Chunk]) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        batch: list[memoryview] = []
        size = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            for start in range(0, len(view), BATCH_BYTES):
                piece = view[start : start + BATCH_BYTES]
                if self._blocking:
                    if size + len(piece) > BATCH_BYTES and batch:
                        await self._write_in_thread(batch)
                        batch, size = [], 0
                    batch.append(piece)
                    size += len(piece)
                else:
                    await self._write_nonblocking(piece)
        if batch:
            await self._write_in_thread(batch)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _write_in_thread(self, views: list[memoryview]) -> None:
        # Not abandoned on cancel: a write still running in a thread after the sink was
        # closed could hit a reused fd number. The cancel is seen after this batch.
        await trio.to_thread.run_sync(self._write_views, views)

    def _write_views(self, views: list[memoryview]) -> None:
        for view in views:
            while view:
                n = self._write(self.fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "data fd accepted 0 bytes")
                self.written += n
                view = view[n:]

    async def _write_nonblocking(self, view: memoryview) -> None:
        while view:
            try:
                n = self._write(self.fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)
                continue
            if n <= 0:
                raise OSError(errno.EIO, "data fd accepted 0 bytes")
            self.written += n
            view = view[n:]

    def close(self) -> None:
        if self.owned:
            self.owned = False
            os.close(self.fd)


#: What a data fd write's errno means when a driver uses it to refuse the stream (the
#: bytes came from our own buffers, so EFAULT is never ours: Linux's mtty sample answers
#: it to a header not its own, ENOMEM to a stream longer than its state).
_WRITE_NOTES = {
    errno.EFAULT: " (the driver refused the stream: not its device's state?)",
    errno.ENOMEM: " (the driver refused the stream: longer than its device's state?)",
}


def _write_error(name: str, data: _DataFd, exc: OSError) -> SinkError:
    note = _WRITE_NOTES.get(exc.errno or 0, "")
    return SinkError(
        f"vfio device {name}: data fd write failed at byte {data.written}: {exc}{note}",
        errno=exc.errno,
    )


class VfioSink(Sink):
    """A kernel VFIO device, driven through its device fd.

    Build it with `open` (a device path; the sink opens it in `start` and owns it) or
    `from_device_fd` (a fd the caller already has). For a data fd alone, see
    `from_data_fd`.
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        device_fd: int | None = None,
        owned: bool = False,
        ioctl: IoctlFn = uapi.sys_ioctl,
        write: WriteFn = os.write,
        iommu_path: str = IOMMU_PATH,
        group_device: str | None = None,
        container_path: str = CONTAINER_PATH,
    ) -> None:
        self._dev = DeviceFd(
            path=path,
            fd=device_fd,
            owned=owned,
            ioctl=ioctl,
            iommu_path=iommu_path,
            error=SinkError,
            group_device=group_device,
            container_path=container_path,
        )
        self._write = write
        self._data: _DataFd | None = None
        self._written = 0  # bytes of data fds already closed
        # _moved: we issued a SET, so the device's state is our business (a device found
        # in RESUMING or ERROR before that belongs to someone else: never reset it).
        # _session: RESUMING was entered and neither left cleanly nor reset; while it
        # holds, any failure resets the device.
        self._moved = False
        self._session = False
        self._closed = False
        self.name = self._dev.name
        self.description = f"vfio:{self.name}"

    @classmethod
    def open(
        cls,
        path: str,
        *,
        device: str | None = None,
        ioctl: IoctlFn = uapi.sys_ioctl,
        write: WriteFn = os.write,
        iommu_path: str = IOMMU_PATH,
        container_path: str = CONTAINER_PATH,
    ) -> VfioSink:
        """A sink for the device cdev at ``path`` (``/dev/vfio/devices/vfioN``): opened in
        `start` and bound to a new iommufd (``iommu_path``) before any other ioctl, as the
        kernel requires of a cdev; both closed in `aclose`. With ``device``, ``path`` is a
        group (``/dev/vfio/GROUP``) and ``device`` the name of one of its devices: the
        group joins a new container (``container_path``) and hands out the device fd.
        A device the VMM already has open cannot be opened a second time either way:
        give the VMM's fd instead (``vfio:fd:N`` or ``attach-fd``)."""
        return cls(
            path=path,
            ioctl=ioctl,
            write=write,
            iommu_path=iommu_path,
            group_device=device,
            container_path=container_path,
        )

    @classmethod
    def from_device_fd(
        cls,
        fd: int,
        *,
        owned: bool = False,
        ioctl: IoctlFn = uapi.sys_ioctl,
        write: WriteFn = os.write,
    ) -> VfioSink:
        """A sink for an open device fd (e.g. ``attach-fd`` kind ``vfio-device``).

        ``owned=True`` transfers the fd: `aclose` closes it. Otherwise it stays open.
        """
        return cls(device_fd=fd, owned=owned, ioctl=ioctl, write=write)

    @staticmethod
    def from_data_fd(fd: int, *, owned: bool = False, write: WriteFn = os.write) -> DataFdSink:
        """A sink for a data fd already in RESUMING (``attach-fd`` kind ``data``)."""
        return DataFdSink(fd, owned=owned, write=write)

    # -- the Sink interface --------------------------------------------------------------

    async def start(self) -> None:
        """GET MIGRATION, SET RESUMING, keep the data fd.

        Cancellation: the ioctls are not interruptible; a cancel is seen before them.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed or self._moved:
            raise SinkError(f"vfio device {self.name}: sink already started or closed")
        self._dev.open()
        self._dev.migration_flags()
        state = self._dev.state()
        if state in (MigState.RESUMING, MigState.ERROR):
            # SET RESUMING from RESUMING is a no-op without a data fd; ERROR needs a reset
            # that is the VMM's call, not ours.
            raise SinkError(
                f"vfio device {self.name}: device is in {state_name(state)} before the "
                f"migration (expected RUNNING or STOP)"
            )
        self._moved = True
        try:
            data_fd = await self._dev.set_state(MigState.RESUMING)
        except OSError as exc:
            note = await self._recover()
            raise self._error("entering RESUMING failed", exc, note) from exc
        self._session = True
        if data_fd < 0:
            note = await self._recover()
            raise SinkError(
                f"vfio device {self.name}: entering RESUMING returned no data fd ({note})"
            )
        try:
            self._data = _DataFd(data_fd, self._write, owned=True)
        except OSError as exc:
            os.close(data_fd)
            note = await self._recover()
            raise self._error("data fd unusable", exc, note) from exc

    async def write(self, chunks: Sequence[Chunk]) -> None:
        if self._data is None:
            raise SinkError(f"vfio device {self.name}: write without a RESUMING session")
        try:
            await self._data.write(chunks)
        except OSError as exc:
            raise _write_error(self.name, self._data, exc) from exc

    async def finish(self) -> None:
        """Close the data fd, then SET STOP: the driver validates the stream here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._session or self._dev.fd is None:
            raise SinkError(f"vfio device {self.name}: finish without a RESUMING session")
        self._close_data()
        try:
            data_fd = await self._dev.set_state(MigState.STOP)
        except OSError as exc:
            note = await self._recover()
            raise self._error(
                "leaving RESUMING failed", exc, f"driver rejected the state; {note}"
            ) from exc
        self._session = False
        if data_fd >= 0:  # no saving session starts at STOP; never leak one if it does
            os.close(data_fd)

    async def abort(self) -> None:
        """Close the data fd; if a session was (or may have been) open, reset the device."""
        self._close_data()
        if self._session:  # failures in start/finish already recovered
            await self._recover()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """Release every fd; a session still open is aborted (reset) first. Idempotent."""
        if not self._closed:
            self._closed = True
            self._close_data()
            if self._session:
                await self._recover()
            self._dev.close()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def statistics(self) -> dict[str, int]:
        """Bytes written to the device's data fds so far."""
        current = self._data.written if self._data is not None else 0
        return {"written": self._written + current}

    # -- internals -----------------------------------------------------------------------

    async def _recover(self) -> str:
        """`_recover_now` in a worker thread, shielded: an abort must complete."""
        with trio.CancelScope(shield=True):
            note = await trio.to_thread.run_sync(self._recover_now)
        return note

    def _close_data(self) -> None:
        # Dropped, never reused, after any failure: the session it belonged to is over.
        data, self._data = self._data, None
        if data is not None:
            self._written += data.written
            try:
                data.close()
            except OSError:
                pass

    def _recover_now(self) -> str:
        """Reset the device if a session was open or it is in ERROR/RESUMING; never raises.

        Returns what happened, for error messages.
        """
        fd = self._dev.fd
        if fd is None or not self._moved:
            return "device untouched"
        try:
            state: int | None = uapi.get_state(fd, ioctl=self._dev.ioctl)
        except OSError:
            state = None
        seen = "unknown" if state is None else state_name(state)
        if not self._session and state not in (MigState.ERROR, MigState.RESUMING):
            return f"device in {seen}"
        self._session = False
        try:
            uapi.reset(fd, ioctl=self._dev.ioctl)
        except OSError as exc:
            return f"device in {seen}, reset failed: {exc}"
        return f"device was in {seen}, reset"

    def _error(self, what: str, exc: OSError, note: str | None = None) -> SinkError:
        error = self._dev.error(what, exc, note)
        assert isinstance(error, SinkError)
        return error


class DataFdSink(Sink):
    """A data fd the VMM already put in RESUMING: this sink only writes it.

    `finish` and `abort` close it when owned, so that the VMM's own SET out of RESUMING
    sees every byte; validation errors and the reset are on the VMM's side.
    """

    def __init__(self, fd: int, *, owned: bool = False, write: WriteFn = os.write) -> None:
        self._fd = fd
        self._owned = owned
        self._write = write
        self._data: _DataFd | None = None
        self.name = f"data fd {fd}"
        self.description = f"vfio:{self.name}"

    async def start(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._data is not None or self._fd < 0:
            raise SinkError(f"vfio device {self.name}: sink already started or closed")
        try:
            self._data = _DataFd(self._fd, self._write, owned=self._owned)
        except OSError as exc:
            raise SinkError(
                f"vfio device {self.name}: data fd unusable: {exc}", errno=exc.errno
            ) from exc

    async def write(self, chunks: Sequence[Chunk]) -> None:
        if self._data is None:
            raise SinkError(f"vfio device {self.name}: write before start")
        try:
            await self._data.write(chunks)
        except OSError as exc:
            raise _write_error(self.name, self._data, exc) from exc

    async def finish(self) -> None:
        self._close()
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        self._close()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        self._close()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def statistics(self) -> dict[str, int]:
        return {"written": self._data.written if self._data is not None else 0}

    def _close(self) -> None:
        if self._owned and self._fd >= 0:
            self._owned = False
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1
        self._data = None  # the fd number may be reused from now on


def open_vfio_sink(arg: str) -> Sink:
    """The ``vfio:`` spec: ``vfio:PATH`` opens a device cdev; ``vfio:GROUP,device=NAME``
    a device of a group (the container API); ``vfio:fd:N`` uses an inherited device fd
    N, which the sink then owns."""
    spec = parse_spec("sink", arg)
    if spec.fd is not None:
        return VfioSink.from_device_fd(spec.fd, owned=True)
    assert spec.path is not None
    return VfioSink.open(spec.path, device=spec.group_device)
