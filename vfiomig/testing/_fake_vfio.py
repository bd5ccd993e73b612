"""A fake kernel VFIO device with migration v2 support, for tests without hardware.

`FakeVfioDevice` plugs in where the real kernel would answer: its `~FakeVfioDevice.ioctl`
has the signature of `vfiomig.vfio._uapi.IoctlFn` and its `~FakeVfioDevice.write`
the signature of ``os.write``. It models what a migration driver plus the VFIO core do
(``drivers/vfio/vfio_main.c``, ``reference/vfio-user-and-uapi.md`` §1):

- the feature ioctl's checks in the core's order: argsz < 8 and unknown flag bits ->
  EINVAL; GET|SET without PROBE -> EINVAL; migration features on a device without
  migration -> ENOTTY; an op the feature lacks, or a short payload -> EINVAL; PROBE -> 0;
- the FSM with the kernel's own next-state table (`next_state`), so a SET to a distant
  state walks the same arcs as ``vfio_mig_get_next_state``; ERROR cannot be requested or
  left except by VFIO_DEVICE_RESET, which returns to RUNNING and ends any session;
- entering RESUMING creates a new data fd: the write end of a real pipe, O_CLOEXEC,
  blocking like the kernel's. The caller owns it. Bytes written are drained into
  `received` after every write (so the pipe never fills) and before RESUMING -> STOP,
  which validates them against ``expected`` (EINVAL, optionally going to ERROR);
- writes to a session that ended fail with ENODEV (the driver disables the file);
- the saving side (``saving``, a `SavingModel`, see `vfiomig.testing._fake_saving`):
  RUNNING -> PRE_COPY and STOP -> STOP_COPY return a read-only data fd that the fake's
  `~FakeVfioDevice.read` (the signature of ``os.read``) serves: initial and dirty
  PRE_COPY data, ENOMSG at its temporary end, the STOP_COPY data, then 0 (end of
  stream); VFIO_MIG_GET_PRECOPY_INFO on that fd with the driver's errnos (EINVAL outside
  PRE_COPY/PRE_COPY_P2P or for a short argsz, ENOTTY on any other fd); reads after the
  session ended fail with ENODEV. Without a model a saving session is an empty stream.

The device itself is a real file (a temporary file unless ``path`` is given): `path` can
be opened like a cdev and `open` returns a fresh fd; the ioctl answers ENOTTY for an fd
that is not open on that file, as the kernel does for any non-VFIO file.

With ``cdev=True`` the device behaves as one opened from ``/dev/vfio/devices/vfioN``
(``vfio_device_fops_unl_ioctl``, ``vfio_df_ioctl_bind_iommufd``): every ioctl but
VFIO_DEVICE_BIND_IOMMUFD answers EINVAL until that fd is bound to an iommufd, an open fd
on `iommu_path` (a second temporary file standing in for ``/dev/iommu``: EBADF for a
closed fd, EBADFD for another file); a second bind, or a bind while another fd of the
device is bound (the VMM has it), is EINVAL. `open` then returns an fd already bound, as
the VMM's would be.

What the stream must be, checked as a driver does on the fly (as Linux's mtty sample
does): ``header_size`` (with ``expected``: the write that completes the first
``header_size`` bytes fails with EFAULT when they differ from ``expected``'s, its bytes
kept, as mtty keeps them) and ``stream_limit`` (a write that would take the stream past
it fails with ENOMEM, nothing taken).

Faults: ``max_write`` (short writes), ``write_errno_at`` (an errno from the write that
would reach a byte offset), ``would_block`` (EAGAIN from the next N writes),
``stop_errno`` (RESUMING -> STOP fails regardless of the data), ``fail_arcs`` (any arc
fails with an errno), ``error_on_failure`` (a failed arc leaves the device in ERROR
instead of the state it was in).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType

from vfiomig.testing._fake_fsm import PC, PCP, RES, RUN, SAVING, SC, STOP, E, next_state
from vfiomig.testing._fake_saving import SavingModel, SavingSession
from vfiomig.vfio._uapi import (
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_RESET,
    VFIO_MIG_GET_PRECOPY_INFO,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_STOP_COPY,
    MigState,
)

_HEADER = struct.Struct("=II")
_MIG_STATE = struct.Struct("=Ii")
_U64 = struct.Struct("=Q")
_BIND = struct.Struct("=IIiI")
_PRECOPY_INFO = struct.Struct("=IIQQ")


def _fd_identity(fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file open on ``fd``; None for a closed fd."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class _Session:
    """One RESUMING session: the pipe behind the data fd the caller received."""

    write_fd: int  # owned by the caller from the moment SET returns it
    read_fd: int  # owned by the fake
    pipe: tuple[int, int]  # (st_dev, st_ino) of the pipe, to recognise the fd or a dup
    live: bool = True
    received: bytearray = field(default_factory=bytearray)


class FakeVfioDevice:
    """A VFIO device with migration v2 support, answering at the ioctl-function level.

    Thread-safe: ``write`` may run in a worker thread while the event loop thread calls
    ``ioctl`` (one lock around the whole model). Use as a context manager, or call
    `close` to release the fake's own fds and its temporary file.
    """

    def __init__(
        self,
        *,
        migration: bool = True,
        flags: int = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
        state: MigState = MigState.RUNNING,
        expected: bytes | None = None,
        max_write: int | None = None,
        write_errno_at: tuple[int, int] | None = None,
        would_block: int = 0,
        stop_errno: int | None = None,
        fail_arcs: Mapping[tuple[MigState, MigState], int] | None = None,
        error_on_failure: bool = False,
        nonblocking_data_fd: bool = False,
        path: str | None = None,
        cdev: bool = False,
        saving: SavingModel | None = None,
        header_size: int = 0,
        stream_limit: int | None = None,
    ) -> None:
        self.migration = migration
        self.flags = flags
        self.state = state
        self.expected = expected
        self.max_write = max_write
        self.write_errno_at = write_errno_at
        self.would_block = would_block
        self.stop_errno = stop_errno
        self.fail_arcs = dict(fail_arcs or {})
        self.error_on_failure = error_on_failure
        self.nonblocking_data_fd = nonblocking_data_fd
        self.header_size = header_size
        self.stream_limit = stream_limit
        #: Every FSM arc the driver took, as (from, to); a reset is not an arc.
        self.arcs: list[tuple[MigState, MigState]] = []
        #: Every arc the driver was asked to take, failed ones too (mtty logs each one).
        self.steps: list[tuple[MigState, MigState]] = []
        #: Every ioctl, as (request, flags or None); for assertions.
        self.calls: list[tuple[int, int | None]] = []
        self.resets = 0
        #: The size each successful write accepted.
        self.write_sizes: list[int] = []
        #: The stream of the last session that left RESUMING successfully.
        self.loaded: bytes | None = None
        #: Whether the data fd was still open when RESUMING -> STOP ran (last attempt).
        self.data_fd_open_at_stop: bool | None = None
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self.saving = saving or SavingModel()
        #: The current (or last) saving session: `SavingSession.saved` is what it gave.
        self.saving_session: SavingSession | None = None
        self._dead_pipes: set[tuple[int, int]] = set()
        self._own_file = path is None
        if path is None:
            fd, path = tempfile.mkstemp(prefix="fake-vfio-")
            os.close(fd)
        self.path = path
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        self.cdev = cdev
        #: The fds bound to an iommufd (cdev mode), by fd number.
        self.bound: set[int] = set()
        self.iommu_path: str | None = None
        if cdev:
            fd, self.iommu_path = tempfile.mkstemp(prefix="fake-iommu-")
            os.close(fd)
            st = os.stat(self.iommu_path)
            self._iommu_identity = (st.st_dev, st.st_ino)

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> int:
        """A new fd on the device, as a VMM holds it: opened and, for a cdev, bound
        (caller owns it)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        if self.cdev:
            with self._lock:
                self.bound.add(fd)
        return fd

    def close(self) -> None:
        """Release the fake's fds (not the data fd: the caller owns that) and its file."""
        with self._lock:
            self._end_session()
            self._end_saving()
        for name in (self.path if self._own_file else None, self.iommu_path):
            if name is not None:
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> FakeVfioDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what tests look at --------------------------------------------------------------

    @property
    def received(self) -> bytes:
        """What the current (or last) session received so far."""
        with self._lock:
            if self._session is None:
                return b""
            self._drain(self._session)
            return bytes(self._session.received)

    @property
    def session_open(self) -> bool:
        with self._lock:
            return self._session is not None and self._session.live

    # -- the ioctl function ----------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: bytearray | int | None) -> int:
        """`vfiomig.vfio._uapi.IoctlFn`: answers as the kernel would, or raises OSError."""
        # Every request here but the reset takes a pointer: an int is an address the fake
        # cannot read (the kernel's copy_from_user would fault), the reset ignores it.
        buf = arg if isinstance(arg, bytearray) else None
        if isinstance(arg, int) and request != VFIO_DEVICE_RESET:
            raise _oserror(errno.EFAULT)
        with self._lock:
            if request == VFIO_MIG_GET_PRECOPY_INFO:
                self.calls.append((request, None))
                return self._precopy_info(fd, buf)
            self._check_fd(fd)
            if self.cdev:
                if request == VFIO_DEVICE_BIND_IOMMUFD:
                    self.calls.append((request, None))
                    return self._bind(fd, buf)
                if fd not in self.bound:
                    raise _oserror(errno.EINVAL)  # df->access_granted is false
            if request == VFIO_DEVICE_RESET:
                self.calls.append((request, None))
                self._reset()
                return 0
            if request != VFIO_DEVICE_FEATURE:
                raise _oserror(errno.ENOTTY)
            if buf is None or len(buf) < _HEADER.size:
                raise _oserror(errno.EFAULT)
            argsz, flags = _HEADER.unpack_from(buf)
            self.calls.append((request, flags))
            return self._feature(buf, argsz, flags)

    def _bind(self, fd: int, buf: bytearray | None) -> int:
        if buf is None or len(buf) < _BIND.size:
            raise _oserror(errno.EFAULT)
        argsz, flags, iommufd, _ = _BIND.unpack_from(buf)
        if argsz < _BIND.size or flags:
            raise _oserror(errno.EINVAL)
        iommu = _fd_identity(iommufd)
        if iommu is None:
            raise _oserror(errno.EBADF)
        if iommu != self._iommu_identity:
            raise _oserror(errno.EBADFD)
        self.bound = {b for b in self.bound if _fd_identity(b) == self._identity}  # not closed
        if self.bound:  # bound here already, or the device is open elsewhere
            raise _oserror(errno.EINVAL)
        self.bound.add(fd)
        _BIND.pack_into(buf, 0, argsz, flags, iommufd, 1)  # out_devid
        return 0

    def _precopy_info(self, fd: int, buf: bytearray | None) -> int:
        """The driver's ioctl on a saving data fd (mlx5_precopy_ioctl's checks, in order)."""
        identity = _fd_identity(fd)
        if identity is None:
            raise _oserror(errno.EBADF)
        saving = self.saving_session
        if saving is None or identity != saving.pipe:
            raise _oserror(errno.ENOTTY)  # the device fd, a RESUMING fd, any other file
        if buf is None or len(buf) < _PRECOPY_INFO.size:
            raise _oserror(errno.EFAULT)
        argsz = _HEADER.unpack_from(buf)[0]
        if argsz < _PRECOPY_INFO.size or self.state not in (PC, PCP):
            raise _oserror(errno.EINVAL)
        if not saving.live:
            raise _oserror(errno.ENODEV)
        initial, dirty = saving.precopy_info()
        _PRECOPY_INFO.pack_into(buf, 0, argsz, 0, initial, dirty)
        return 0

    def _check_fd(self, fd: int) -> None:
        identity = _fd_identity(fd)
        if identity is None:
            raise _oserror(errno.EBADF)
        if identity != self._identity:
            raise _oserror(errno.ENOTTY)

    def _feature(self, buf: bytearray, argsz: int, flags: int) -> int:
        known = VFIO_DEVICE_FEATURE_MASK | VFIO_DEVICE_FEATURE_GET
        known |= VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE
        if argsz < _HEADER.size or flags & ~known:
            raise _oserror(errno.EINVAL)
        get, set_ = flags & VFIO_DEVICE_FEATURE_GET, flags & VFIO_DEVICE_FEATURE_SET
        probe = flags & VFIO_DEVICE_FEATURE_PROBE
        if get and set_ and not probe:
            raise _oserror(errno.EINVAL)
        if argsz > len(buf):
            raise _oserror(errno.EFAULT)  # the kernel would read past the user's buffer
        feature = flags & VFIO_DEVICE_FEATURE_MASK
        payload = argsz - _HEADER.size
        if feature == VFIO_DEVICE_FEATURE_MIGRATION:
            if not self._check_feature(flags, payload, VFIO_DEVICE_FEATURE_GET, _U64.size):
                return 0
            _U64.pack_into(buf, 8, self.flags)
            return 0
        if feature == VFIO_DEVICE_FEATURE_MIG_DATA_SIZE:
            if not self._check_feature(flags, payload, VFIO_DEVICE_FEATURE_GET, _U64.size):
                return 0
            saving = self.saving.initial + self.saving.stop_copy  # without precopy
            size = saving if self.expected is None else len(self.expected)
            _U64.pack_into(buf, 8, size)
            return 0
        if feature == VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE:
            ops = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET
            if not self._check_feature(flags, payload, ops, _MIG_STATE.size):
                return 0
            requested, _ = _MIG_STATE.unpack_from(buf, 8)
            if get:
                _MIG_STATE.pack_into(buf, 8, self.state, -1)
                return 0
            try:
                data_fd = self._set_state(requested)
            except OSError:
                # vfio_ioctl_device_feature_mig_device_state copies mig back (data_fd -1)
                # before it returns the error.
                _MIG_STATE.pack_into(buf, 8, requested, -1)
                raise
            _MIG_STATE.pack_into(buf, 8, requested, data_fd)
            return 0
        raise _oserror(errno.EINVAL)  # unknown feature: the core's default branch

    def _check_feature(self, flags: int, payload: int, ops: int, minsz: int) -> bool:
        """``vfio_check_feature`` after the mig_ops check; False for a PROBE that passed."""
        if not self.migration:
            raise _oserror(errno.ENOTTY)
        if flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET) & ~ops:
            raise _oserror(errno.EINVAL)
        if flags & VFIO_DEVICE_FEATURE_PROBE:
            return False
        if not flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET):
            raise _oserror(errno.EINVAL)
        if payload < minsz:
            raise _oserror(errno.EINVAL)
        return True

    # -- the FSM ----------------------------------------------------------------------------

    def _set_state(self, new: int) -> int:
        data_fd = -1
        while self.state != new:
            step = next_state(self.state, new, self.flags)
            if step is None:
                raise _oserror(errno.EINVAL)
            if data_fd >= 0:  # the kernel's WARN_ON: an fd from an interior arc
                raise _oserror(errno.EINVAL)
            data_fd = self._arc(self.state, step)
        return data_fd

    def _arc(self, cur: MigState, nxt: MigState) -> int:
        self.steps.append((cur, nxt))
        code = self.fail_arcs.get((cur, nxt))
        if cur is RES and nxt is STOP:
            code = code or self._validate()
        if code is not None:
            if self.error_on_failure:
                self.state = E
            raise _oserror(code)
        self.arcs.append((cur, nxt))
        self.state = nxt
        if nxt is RES:
            return self._start_session()
        if cur is RES:
            assert self._session is not None
            self.loaded = bytes(self._session.received)
            self._end_session()
        if nxt in SAVING and cur not in SAVING:
            self._end_saving()
            self.saving_session = SavingSession(self.saving, precopy=nxt is not SC)
            return self.saving_session.fd
        if cur in SAVING:
            assert self.saving_session is not None
            if nxt is SC:
                self.saving_session.enter_stop_copy()
            elif nxt not in SAVING:
                self._end_saving()
        return -1

    def _validate(self) -> int | None:
        session = self._session
        assert session is not None
        self._drain(session)
        self.data_fd_open_at_stop = self._writer_open(session)
        if self.stop_errno is not None:
            return self.stop_errno
        if self.expected is not None and bytes(session.received) != self.expected:
            return errno.EINVAL
        return None

    def _reset(self) -> None:
        self.resets += 1
        self.state = RUN
        self._end_session()
        self._end_saving()

    def _start_session(self) -> int:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        if self.nonblocking_data_fd:
            os.set_blocking(w, False)
        st = os.fstat(w)
        self._session = _Session(write_fd=w, read_fd=r, pipe=(st.st_dev, st.st_ino))
        return w

    def _end_saving(self) -> None:
        saving = self.saving_session
        if saving is not None and saving.live:
            saving.live = False
            self._dead_pipes.add(saving.pipe)
            saving.stop()

    def _end_session(self) -> None:
        session = self._session
        if session is None or not session.live:
            return
        self._drain(session)
        session.live = False
        os.close(session.read_fd)
        self._dead_pipes.add(session.pipe)

    # -- the data fd ----------------------------------------------------------------------

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """``os.write`` for the data fd, with the configured faults; other fds pass through."""
        with self._lock:
            st = os.fstat(fd)  # EBADF for a closed fd, as write(2) would say
            pipe = (st.st_dev, st.st_ino)
            session = self._session
            if pipe in self._dead_pipes:
                raise _oserror(errno.ENODEV)
            if session is None or pipe != session.pipe:
                return os.write(fd, data)
            if self.would_block > 0:
                self.would_block -= 1
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            view = memoryview(data)
            pos = len(session.received)
            if self.stream_limit is not None and pos + len(view) > self.stream_limit:
                raise _oserror(errno.ENOMEM)  # mtty_resume_write: past its data size
            n = min(len(view), fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
            if self.max_write is not None:
                n = min(n, self.max_write)
            if self.write_errno_at is not None:
                offset, code = self.write_errno_at
                pos = len(session.received)
                if pos >= offset:
                    raise _oserror(code)
                n = min(n, offset - pos)
            written = os.write(fd, view[:n])  # the real write; the pipe is empty here
            self._drain(session)
            self.write_sizes.append(written)
            if self._bad_header(pos, pos + written, bytes(session.received)):
                raise _oserror(errno.EFAULT)  # the bytes stay received, as in mtty
            return written

    def read(self, fd: int, n: int) -> bytes:
        """``os.read`` for a saving data fd, as the model says; other fds pass through."""
        with self._lock:
            identity = _fd_identity(fd)
            if identity is None:
                raise _oserror(errno.EBADF)
            if identity in self._dead_pipes:
                raise _oserror(errno.ENODEV)
            saving = self.saving_session
            if saving is not None and identity == saving.pipe and not saving.model.fed:
                return saving.read(n)
        return os.read(fd, n)  # a fed model's socket too (its thread feeds it)

    def _bad_header(self, before: int, after: int, received: bytes) -> bool:
        """The write that took the stream from ``before`` to ``after`` completed a header
        that differs from ``expected``'s."""
        size = self.header_size
        if not size or self.expected is None or not before < size <= after:
            return False
        return received[:size] != self.expected[:size]

    @staticmethod
    def _drain(session: _Session) -> None:
        if not session.live:
            return
        while True:
            try:
                chunk = os.read(session.read_fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            session.received += chunk

    @staticmethod
    def _writer_open(session: _Session) -> bool:
        """True while some fd still holds the pipe's write end (read gives EAGAIN, not EOF)."""
        try:
            chunk = os.read(session.read_fd, 1)
        except BlockingIOError:
            return True
        session.received += chunk
        return bool(chunk)
