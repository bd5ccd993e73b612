"""The server side of a vfio-user device, without I/O: libvfio-user's rules, your callbacks.

`VfioUserDevice` holds what outlives a connection (the migration state and the emulator)
and turns each request into a reply or an errno, following libvfio-user's behaviour
(``lib/libvfio-user.c``, ``lib/migration.c``):

- the migration state starts RUNNING and only changes through DEVICE_FEATURE SET
  MIG_DEVICE_STATE, one direct arc at a time (RESUMING is reached through STOP); each arc
  calls ``emulator.transition``; if that fails the state stays at the last arc that worked;
- MIG_DATA_WRITE only in RESUMING, MIG_DATA_READ only in PRE_COPY or STOP_COPY (EINVAL
  otherwise); their size is at most the client's ``max_data_xfer_size``; a write callback
  that takes fewer bytes than offered is EINVAL ("partial writes are not supported");
- in STOP and STOP_COPY only REGION_READ/WRITE, DEVICE_FEATURE and MIG_DATA_READ are
  executed, and no region but the migration region is reachable in STOP_COPY (vfiomig's
  devices have none, so region access in STOP_COPY is EINVAL);
- a malformed or oversized request is EINVAL; so is a command vfiomig does not implement.

Callbacks fail by raising ``OSError(errno, ...)``; the errno goes back in the ERROR reply.
Any other exception is a bug in the emulator and propagates.

Deliberate difference: DEVICE_RESET puts the migration state back to RUNNING, as the spec
says; libvfio-user stopped doing that in 2026 (PR #844).
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from vfiomig.vfio_user import _fsm
from vfiomig.vfio_user._messages import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_PGSIZE,
    FEATURE_GET,
    FEATURE_HEADER_SIZE,
    FEATURE_MASK,
    FEATURE_MIG_DEVICE_STATE,
    FEATURE_MIGRATION,
    FEATURE_PROBE,
    FEATURE_SET,
    MAJOR,
    MESSAGE_OVERHEAD,
    MIG_DATA_HEADER_SIZE,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    REGION_INFO_SIZE,
    Capabilities,
    Command,
    DeviceFeature,
    Empty,
    Malformed,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigrationCaps,
    MigState,
    Packable,
    RegionInfo,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteReply,
    Version,
)
from vfiomig.vfio_user._protocol import Message

#: Commands executed while the device is in STOP or STOP_COPY.
ALLOWED_WHEN_STOPPED: Final = frozenset(
    {Command.REGION_READ, Command.REGION_WRITE, Command.DEVICE_FEATURE, Command.MIG_DATA_READ}
)
#: libvfio-user's ``LIB_VFIO_USER_MINOR``.
MINOR: Final = 2
_FEATURE_OPS: Final = {
    FEATURE_MIGRATION: FEATURE_GET | FEATURE_PROBE,
    FEATURE_MIG_DEVICE_STATE: FEATURE_GET | FEATURE_SET | FEATURE_PROBE,
}


class Emulator(Protocol):
    """What a Python device emulator provides: libvfio-user's migration v2 callbacks plus
    region access. Fail a callback with ``OSError(errno, text)``.

    ``transition`` gets the wire state (`MigState`), once per arc. ``read_data`` returns
    at most ``size`` bytes, ``b""`` at the end of the stream. ``write_data`` must take
    every byte and return how many it took. Region callbacks get bounds-checked
    arguments (``region_sizes`` gives each region's size; index = position).
    """

    @property
    def region_sizes(self) -> Sequence[int]: ...

    def transition(self, state: MigState) -> None: ...

    def read_data(self, size: int) -> bytes: ...

    def write_data(self, data: memoryview) -> int: ...

    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: memoryview) -> int: ...

    def reset(self) -> None: ...


@dataclass(slots=True)
class Session:
    """What one connection negotiated; a new connection starts a new session."""

    negotiated: bool = False
    client_max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one request: a reply body, or an errno; ``close`` ends the connection."""

    body: Packable | None = None
    errno: int | None = None
    close: bool = False


def _fail(errno: int, *, close: bool = False) -> Outcome:
    return Outcome(errno=errno, close=close)


def _os_errno(exc: OSError) -> int:
    return exc.errno if exc.errno is not None and exc.errno > 0 else _errno.EIO


class VfioUserDevice:
    """One emulated device behind a vfio-user socket; outlives its connections.

    Args:
        emulator: the callbacks.
        max_data_xfer_size: advertised to clients; bounds region access counts, and,
            with the header overhead, the size of every message accepted.
        migration_flags: the DEVICE_FEATURE MIGRATION answer (libvfio-user: STOP_COPY |
            PRE_COPY).
    """

    def __init__(
        self,
        emulator: Emulator,
        *,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        migration_flags: int = MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
        max_msg_fds: int = 8,
    ) -> None:
        if max_data_xfer_size < 1:
            raise ValueError(f"max_data_xfer_size {max_data_xfer_size} is below 1")
        self.emulator = emulator
        self.max_data_xfer_size = max_data_xfer_size
        self.migration_flags = migration_flags
        self.max_msg_fds = max_msg_fds
        self.state = MigState.RUNNING

    @property
    def max_msg_size(self) -> int:
        """The largest message accepted: the data limit plus headers (VERSION fits too)."""
        return max(self.max_data_xfer_size, 4096) + MESSAGE_OVERHEAD

    def handle(self, session: Session, msg: Message) -> Outcome:
        """Execute one request and say what to answer."""
        if not session.negotiated:
            return self._version(session, msg)
        if isinstance(msg.body, Malformed):
            return _fail(_errno.EINVAL)
        if self.state in (MigState.STOP, MigState.STOP_COPY) and (
            msg.command not in ALLOWED_WHEN_STOPPED
        ):
            return _fail(_errno.EINVAL)
        body = msg.body
        match body:
            case DeviceFeature():
                return self._feature(body)
            case MigDataWrite():
                return self._mig_write(session, body)
            case MigDataRead():
                return self._mig_read(session, body)
            case RegionRead():
                return self._region_read(body)
            case RegionWrite():
                return self._region_write(body)
            case RegionInfo():
                return self._region_info(body)
            case Empty() if msg.command == Command.DEVICE_RESET:
                return self._reset()
            case _:  # a second VERSION, DMA_MAP, IRQs, ...: not supported here
                return _fail(_errno.EINVAL)

    # ------------------------------------------------------------------ VERSION

    def _version(self, session: Session, msg: Message) -> Outcome:
        # Like libvfio-user's tran_negotiate: the first message must be a good VERSION,
        # otherwise the client gets EINVAL and is dropped.
        body = msg.body
        if not isinstance(body, Version) or body.major != MAJOR:
            return _fail(_errno.EINVAL, close=True)
        caps = body.capabilities or Capabilities()
        if caps.max_msg_fds is not None and caps.max_msg_fds > 1024:
            return _fail(_errno.EINVAL, close=True)
        session.client_max_data_xfer_size = caps.data_xfer_limit
        session.negotiated = True
        reply = Version(
            MAJOR,
            min(body.minor, MINOR),
            Capabilities(
                max_msg_fds=self.max_msg_fds,
                max_data_xfer_size=self.max_data_xfer_size,
                pgsizes=DEFAULT_PGSIZE,
                migration=MigrationCaps(pgsize=DEFAULT_PGSIZE),
            ),
        )
        return Outcome(body=reply)

    # ------------------------------------------------------------------ DEVICE_FEATURE

    def _feature(self, req: DeviceFeature) -> Outcome:
        ops = req.flags & ~FEATURE_MASK
        supported = _FEATURE_OPS.get(req.feature, 0)
        if not supported or ops & ~supported or not ops:
            return _fail(_errno.EINVAL)
        if ops & FEATURE_PROBE:
            return Outcome(body=req)
        if ops == FEATURE_GET:
            if req.argsz < FEATURE_HEADER_SIZE + 8:
                return _fail(_errno.EINVAL)
            if req.feature == FEATURE_MIGRATION:
                return Outcome(body=DeviceFeature.migration_reply(req, self.migration_flags))
            return Outcome(body=DeviceFeature.state_reply(req, self.state))
        if ops != FEATURE_SET or len(req.data) < 8:
            return _fail(_errno.EINVAL)
        raw = req.device_state()
        if raw not in MigState._value2member_map_:
            return _fail(_errno.EINVAL)
        target = MigState(raw)
        while self.state != target:
            step = _fsm.next_step(self.state, target)
            if step is None:
                return _fail(_errno.EINVAL)
            try:
                self.emulator.transition(step)
            except OSError as exc:
                return _fail(_os_errno(exc))
            self.state = step
        return Outcome(body=req)

    # ------------------------------------------------------------------ MIG_DATA_*

    def _mig_write(self, session: Session, req: MigDataWrite) -> Outcome:
        if self.state != MigState.RESUMING:
            return _fail(_errno.EINVAL)
        if req.size > session.client_max_data_xfer_size:
            return _fail(_errno.EINVAL)
        if req.argsz < MIG_DATA_HEADER_SIZE + req.size:
            return _fail(_errno.EINVAL)
        try:
            taken = self.emulator.write_data(memoryview(req.data))
        except OSError as exc:
            return _fail(_os_errno(exc))
        if taken != req.size:
            return _fail(_errno.EINVAL)
        return Outcome(body=Empty())

    def _mig_read(self, session: Session, req: MigDataRead) -> Outcome:
        if self.state not in (MigState.PRE_COPY, MigState.STOP_COPY):
            return _fail(_errno.EINVAL)
        if req.size > session.client_max_data_xfer_size or req.size > self.max_data_xfer_size:
            return _fail(_errno.EINVAL)
        if req.argsz < MIG_DATA_HEADER_SIZE + req.size:
            return _fail(_errno.EINVAL)
        try:
            data = self.emulator.read_data(req.size)
        except OSError as exc:
            return _fail(_os_errno(exc))
        if len(data) > req.size:
            return _fail(_errno.EINVAL)
        return Outcome(body=MigDataReadReply.of(bytes(data)))

    # ------------------------------------------------------------------ regions, reset

    def _check_region(self, index: int, offset: int, count: int) -> int | None:
        sizes = self.emulator.region_sizes
        if count > self.max_data_xfer_size or index >= len(sizes):
            return _errno.EINVAL
        if offset + count > sizes[index] or self.state == MigState.STOP_COPY:
            return _errno.EINVAL
        return None

    def _region_read(self, req: RegionRead) -> Outcome:
        err = self._check_region(req.region, req.offset, req.count)
        if err is not None:
            return _fail(err)
        try:
            data = self.emulator.region_read(req.region, req.offset, req.count)
        except OSError as exc:
            return _fail(_os_errno(exc))
        if len(data) != req.count:
            return _fail(_errno.EINVAL)
        return Outcome(body=RegionReadReply(req.region, req.offset, req.count, bytes(data)))

    def _region_write(self, req: RegionWrite) -> Outcome:
        err = self._check_region(req.region, req.offset, len(req.data))
        if err is not None:
            return _fail(err)
        try:
            n = self.emulator.region_write(req.region, req.offset, memoryview(req.data))
        except OSError as exc:
            return _fail(_os_errno(exc))
        if n != len(req.data):
            return _fail(_errno.EINVAL)
        return Outcome(body=RegionWriteReply(req.region, req.offset, n))

    def _region_info(self, req: RegionInfo) -> Outcome:
        sizes = self.emulator.region_sizes
        if req.argsz < REGION_INFO_SIZE or req.index >= len(sizes):
            return _fail(_errno.EINVAL)
        return Outcome(
            body=RegionInfo(
                argsz=REGION_INFO_SIZE,
                index=req.index,
                flags=REGION_FLAG_READ | REGION_FLAG_WRITE,
                size=sizes[req.index],
            )
        )

    def _reset(self) -> Outcome:
        try:
            self.emulator.reset()
        except OSError as exc:
            return _fail(_os_errno(exc))
        self.state = MigState.RUNNING
        return Outcome(body=Empty())
