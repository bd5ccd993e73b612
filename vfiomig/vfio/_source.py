"""The kernel VFIO source: read one device's state through the migration v2 uAPI.

`VfioSource` drives the device fd along the kernel's FSM arcs:

- precopy (`start_precopy`, only for a device that offers PRE_COPY and is RUNNING):
  SET PRE_COPY keeps the device running and returns the saving data fd; each round asks
  VFIO_MIG_GET_PRECOPY_INFO on that fd and reads what is available: ENOMSG is the
  uAPI's temporary end of PRE_COPY data (ENODATA is taken the same way);
- switchover (`start`): SET STOP_COPY (from PRE_COPY the kernel walks PRE_COPY_P2P when
  the device has P2P, and keeps the data fd; from RUNNING it walks RUNNING_P2P and STOP
  and returns a new one), then `read` until read() returns 0, the end of the stream;
- `finish`: close the data fd, SET STOP. The source VM's device stays stopped: it now
  lives on at the destination.

On any failure the device goes back to RUNNING where the FSM allows (SET RUNNING; from
ERROR only VFIO_DEVICE_RESET leaves, and that loses the device's state, which the message
says): the source VM keeps running and nothing is lost. Errors name the device, what
failed, the state it happened in, the errno, and where the device was left.

Reads happen in a worker thread (the kernel's data fd is blocking), filling each buffer
across short reads; a read is never abandoned on cancel (the fd number could be reused).
The uAPI calls go through an injectable ``ioctl`` function and the reads through an
injectable ``read`` function (``os.read``); `vfiomig.testing.FakeVfioDevice` provides both.

With the real ``read`` (``os.read``) the STOP_COPY stream goes to `vfiomig send`'s C send
path as a descriptor (`native_stream`, once `start` returned the data fd): a C thread
reads it to its end and the channels' threads send it; a failed read comes back through
`native_failed`, which recovers the device as `read` would have. Such a thread polls the
fd with the job's cancel eventfd before each read, but a VFIO migration fd usually has no
poll operation (mtty's has none: poll says readable at once), so a cancel is seen
between two reads: a read that blocks inside the driver (producing the device's image)
ends first, as a worker thread's read does on the trio path. An injected
``read`` (a fake) keeps the trio sender's path (`read`, each read a packet).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import TypeAlias

import trio

from vfiomig._core._errors import SourceError
from vfiomig._logs import event
from vfiomig.sources import PrecopyInfo, Source
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._device import CONTAINER_PATH, IOMMU_PATH, DeviceFd, parse_spec
from vfiomig.vfio._uapi import IoctlFn, MigState, state_name

log = logging.getLogger("vfiomig")

#: ``read(fd, n) -> bytes``, as ``os.read``.
ReadFn: TypeAlias = Callable[[int, int], bytes]

#: read() errnos that mean "no PRE_COPY data now" (the uAPI documents ENOMSG).
_TEMPORARY_END = (errno.ENOMSG, errno.ENODATA)


class VfioSource(Source):
    """A kernel VFIO device on the sending side; see the module docstring.

    Build it with `open` (a device cdev path: opened and bound in the first step, owned)
    or `from_device_fd` (a fd the VMM already has; borrowed unless ``owned``).
    """

    fills_reads = True  # `_fill` reads until the bytes asked for or the end

    def __init__(
        self,
        *,
        path: str | None = None,
        device_fd: int | None = None,
        owned: bool = False,
        ioctl: IoctlFn = uapi.sys_ioctl,
        read: ReadFn = os.read,
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
            error=SourceError,
            group_device=group_device,
            container_path=container_path,
        )
        self._read = read
        self.name = self._dev.name
        self.description = f"vfio:{self.name}"
        self._data_fd: int | None = None
        self._phase = "idle"  # idle, precopy, stop-copy, stopped, recovered
        self._moved = False  # we issued a SET: the device's state is our business
        self._ended = False
        #: Bytes read from the data fd: in PRE_COPY, and in total.
        self.precopy_bytes = 0
        self.bytes_read = 0

    @classmethod
    def open(
        cls,
        path: str,
        *,
        device: str | None = None,
        ioctl: IoctlFn = uapi.sys_ioctl,
        read: ReadFn = os.read,
        iommu_path: str = IOMMU_PATH,
        container_path: str = CONTAINER_PATH,
    ) -> VfioSource:
        """A source for the device cdev at ``path``, bound to a new iommufd on first use;
        with ``device``, ``path`` is a group and ``device`` one of its devices, opened
        through a new container (as `VfioSink.open`)."""
        return cls(
            path=path,
            ioctl=ioctl,
            read=read,
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
        read: ReadFn = os.read,
    ) -> VfioSource:
        """A source for an open device fd; ``owned=True`` makes `aclose` close it."""
        return cls(device_fd=fd, owned=owned, ioctl=ioctl, read=read)

    # -- precopy ---------------------------------------------------------------------------

    async def start_precopy(self) -> bool:
        """SET PRE_COPY if the device offers it and is RUNNING; False otherwise (then the
        whole state goes in STOP_COPY).

        Cancellation: seen before the ioctls, which are not interruptible.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_phase("idle", "start_precopy")
        self._dev.open()
        flags = self._dev.migration_flags()
        if not flags & uapi.VFIO_MIGRATION_PRE_COPY:
            return False
        state = self._dev.state()
        if state != MigState.RUNNING:
            log.info(
                "%s: in %s, not RUNNING: no precopy",
                self.description,
                state_name(state),
                extra=event("source_no_precopy", self.description, state=state_name(state)),
            )
            return False
        await self._enter(MigState.PRE_COPY, "precopy")
        return True

    async def precopy_info(self) -> PrecopyInfo:
        self._check_phase("precopy", "precopy_info")
        assert self._data_fd is not None
        try:
            initial, dirty = uapi.get_precopy_info(self._data_fd, ioctl=self._dev.ioctl)
        except OSError as exc:
            raise await self._failed("reading the precopy info failed in PRE_COPY", exc) from exc
        await trio.lowlevel.checkpoint()
        return PrecopyInfo(initial, dirty)

    async def read_precopy(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of PRE_COPY data; ``b""`` at its temporary end (ENOMSG)."""
        self._check_phase("precopy", "read_precopy")
        data = await self._fill(max_bytes, precopy=True)
        self.precopy_bytes += len(data)
        return data

    # -- switchover and stop-copy ----------------------------------------------------------

    async def start(self) -> None:
        """SET STOP_COPY: from PRE_COPY, keeping its data fd; otherwise from RUNNING or
        STOP with a new one."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._phase == "precopy":
            await self._enter(MigState.STOP_COPY, "stop-copy")
            return
        self._check_phase("idle", "start")
        self._dev.open()
        self._dev.migration_flags()
        state = self._dev.state()
        if state not in (MigState.RUNNING, MigState.STOP, MigState.RUNNING_P2P):
            raise SourceError(
                f"vfio device {self.name}: device is in {state_name(state)} before the "
                "migration (expected RUNNING or STOP)",
            )
        await self._enter(MigState.STOP_COPY, "stop-copy")

    def streams_natively(self) -> bool:
        """The C send path reads the data fd itself only through read(2): an injected
        ``read`` (a fake's) is called by `read`."""
        return self._read is os.read

    def native_stream(self) -> tuple[object, ...] | None:
        """In STOP_COPY, before any read: the data fd, polled (a cancel is seen before each
        read; a VFIO fd without a poll operation is always readable). The fd stays this
        source's: `finish` or `abort` closes it after the C threads are joined."""
        if self._phase != "stop-copy" or self._data_fd is None or not self.streams_natively():
            return None
        return ("fd", self._data_fd, True)

    async def native_failed(self, exc: OSError, offset: int) -> BaseException:
        """The C send path's read failed after ``offset`` bytes of STOP_COPY data: the
        device is recovered and the error says where, as `read` would."""
        self.bytes_read += offset
        return await self._failed(
            f"reading the data fd failed in STOP_COPY at byte {self.bytes_read}", exc
        )

    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of STOP_COPY data; ``b""`` once read() returned 0."""
        self._check_phase("stop-copy", "read")
        if self._ended:
            await trio.lowlevel.checkpoint()
            return b""
        return await self._fill(max_bytes, precopy=False)

    async def finish(self) -> None:
        """Close the data fd, then SET STOP: the saving session is over."""
        self._check_phase("stop-copy", "finish")
        self._close_data()
        try:
            await self._dev.set_state(MigState.STOP)
        except OSError as exc:
            raise await self._failed("leaving STOP_COPY for STOP failed", exc) from exc
        self._phase = "stopped"

    async def abort(self) -> None:
        """Back to RUNNING (the migration failed); never raises."""
        if self._moved and self._phase != "recovered":
            note = await self._recover()
            log.warning(
                "%s: migration failed: %s",
                self.description,
                note,
                extra=event("source_aborted", self.description, state=note),
            )
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """A device left mid-migration (neither stopped nor recovered) is recovered first;
        then every fd this source owns is closed. Idempotent."""
        if self._moved and self._phase not in ("stopped", "recovered"):
            await self.abort()
        self._close_data()
        self._dev.close()
        await trio.lowlevel.cancel_shielded_checkpoint()

    # -- internals -------------------------------------------------------------------------

    def _check_phase(self, expected: str, call: str) -> None:
        if self._phase != expected:
            raise SourceError(f"vfio device {self.name}: {call} in phase {self._phase}")

    async def _enter(self, state: MigState, phase: str) -> None:
        """SET ``state``; keep the data fd it returns (a new saving session) or the one
        the saving group already has."""
        self._moved = True
        try:
            data_fd = await self._dev.set_state(state)
        except OSError as exc:
            what = f"entering {state.name} failed"
            if self._phase == "precopy":
                what = f"leaving PRE_COPY for {state.name} failed"
            raise await self._failed(what, exc) from exc
        if data_fd >= 0:
            self._close_data()  # a new session replaces the group's fd, never both
            self._data_fd = data_fd
        self._phase = phase
        if self._data_fd is None:
            raise await self._failed_plain(f"entering {state.name} returned no data fd")

    async def _fill(self, max_bytes: int, *, precopy: bool) -> bytes:
        try:
            return await trio.to_thread.run_sync(self._fill_now, max_bytes, precopy)
        except OSError as exc:
            where = "PRE_COPY" if precopy else "STOP_COPY"
            raise await self._failed(
                f"reading the data fd failed in {where} at byte {self.bytes_read}", exc
            ) from exc

    def _fill_now(self, max_bytes: int, precopy: bool) -> bytes:
        fd = self._data_fd
        assert fd is not None
        chunks: list[bytes] = []
        got = 0
        while got < max_bytes:
            try:
                chunk = self._read(fd, max_bytes - got)
            except OSError as exc:
                if precopy and exc.errno in _TEMPORARY_END:
                    break
                raise
            if not chunk:
                self._ended = not precopy
                break
            chunks.append(chunk)
            got += len(chunk)
            self.bytes_read += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _failed(self, what: str, exc: OSError) -> SourceError:
        """Recover the device, then the error naming what failed and where it was left."""
        note = await self._recover()
        error = self._dev.error(what, exc, note)
        assert isinstance(error, SourceError)
        return error

    async def _failed_plain(self, what: str) -> SourceError:
        note = await self._recover()
        return SourceError(f"vfio device {self.name}: {what} ({note})")

    async def _recover(self) -> str:
        """`_recover_now` in a worker thread, shielded: a recovery must complete."""
        with trio.CancelScope(shield=True):
            note = await trio.to_thread.run_sync(self._recover_now)
        return note

    def _close_data(self) -> None:
        fd, self._data_fd = self._data_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _recover_now(self) -> str:
        """Close the data fd and return the device to RUNNING; never raises.

        Returns where the device was left, for error messages.
        """
        self._close_data()
        fd = self._dev.fd
        if fd is None or not self._moved:
            return "device untouched"
        self._phase = "recovered"
        ioctl = self._dev.ioctl
        try:
            state: int | None = uapi.get_state(fd, ioctl=ioctl)
        except OSError:
            state = None
        if state == MigState.RUNNING:
            return "device in RUNNING"
        if state != MigState.ERROR:
            seen = "unknown state" if state is None else state_name(state)
            try:
                back = uapi.set_state(fd, MigState.RUNNING, ioctl=ioctl)
            except OSError as exc:
                try:
                    state = uapi.get_state(fd, ioctl=ioctl)
                except OSError:
                    return f"device was in {seen}, SET RUNNING failed: {exc}; state unknown"
                if state != MigState.ERROR:
                    return f"device was in {seen}, SET RUNNING failed: {exc}; left in {state_name(state)}"
            else:
                if back >= 0:
                    os.close(back)
                return f"device back in RUNNING from {seen}"
        try:
            uapi.reset(fd, ioctl=ioctl)
        except OSError as exc:
            return f"device in ERROR, reset failed: {exc}"
        return "device was in ERROR, reset to RUNNING: its state is lost"


def open_vfio_source(arg: str) -> Source:
    """The ``vfio:`` source spec: ``vfio:PATH`` opens a device cdev;
    ``vfio:GROUP,device=NAME`` a device of a group (the container API); ``vfio:fd:N``
    uses an inherited device fd N, which the source then owns."""
    spec = parse_spec("source", arg)
    if spec.fd is not None:
        return VfioSource.from_device_fd(spec.fd, owned=True)
    assert spec.path is not None
    return VfioSource.open(spec.path, device=spec.group_device)
