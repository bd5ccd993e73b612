"""Migration v2 on the server: the device state machine and the MIG_DATA_* rules.

The state starts RUNNING and changes through DEVICE_FEATURE SET MIG_DEVICE_STATE, one
direct arc at a time along libvfio-user's paths (`_fsm`; libvfio-user has no P2P
states, nor do we); each arc calls the emulator's ``transition(old, new)`` (or, the
older form, ``transition(new)``: told apart by how many arguments it requires); if that
fails the state stays at the last arc that worked. MIG_DATA_READ is served in PRE_COPY
and STOP_COPY, MIG_DATA_WRITE in RESUMING (EINVAL otherwise); a write the emulator takes
only part of is EINVAL ("partial writes are not supported").

An emulator that keeps the state in memory of its own can also have the server receive
each MIG_DATA_WRITE body straight into that memory (`WriteBuffer`): the server asks
``write_buffer(size)`` for a writable view, receives the body into it and calls
``write_commit(size)`` once all of it is there. A body that does not arrive whole (the
client went away or broke the stream inside it, the server was cancelled) is never
committed: the device is reset instead (`ResetReason.TORN_WRITE`), so the emulator hears
of it and a partly loaded device never runs.
"""

from __future__ import annotations

import errno
import inspect
from collections.abc import Callable
from typing import Protocol, cast

from vfiomig.vfio_user import _fsm
from vfiomig.vfio_user._migration_bodies import MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, MigState
from vfiomig.vfio_user.server._session import emulator_error

Buffer = bytes | bytearray | memoryview
#: ``transition(old, new)``: the arc walked. ``transition(new)`` is the older form.
Transition = Callable[[MigState, MigState], None] | Callable[[MigState], None]
_STOPPED = frozenset({MigState.STOP, MigState.STOP_COPY})


class MigrationCallbacks(Protocol):
    """libvfio-user's ``vfu_migration_callbacks_t``; fail with ``OSError(errno, text)``.

    ``transition(old, new)`` is called for each arc walked, one at a time, before the
    device is in ``new``: what to do often depends on where the device comes from (the
    incoming state is complete when it leaves RESUMING, not whenever it enters STOP).
    A ``transition(new)`` taking one argument (libvfio-user's form) gets only the state
    entered; the state left is then ``device.state`` during the call. ``read_data``
    returns at most ``size`` bytes (empty at the end of the stream); a view of the
    emulator's own memory is fine: the reply is sent whole before the server calls back
    again.
    ``write_data`` gets a view of the received bytes (valid during the call only, no copy
    made) and returns how many it took: all of them, or the write fails. An emulator may
    add `WriteBuffer` to have the bodies received straight into its memory instead.
    """

    @property
    def transition(self) -> Transition: ...

    def read_data(self, size: int) -> Buffer: ...

    def write_data(self, data: memoryview) -> int: ...


def two_state_transition(callback: Transition) -> Callable[[MigState, MigState], None]:
    """``callback`` as ``transition(old, new)``: a callback that requires two positional
    arguments (or takes ``*args``) gets both, one that requires one gets ``new``."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the older, one-state form
        params = None
    if params is not None:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        required = [p for p in params if p.kind in kinds and p.default is p.empty]
        if len(required) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
            return cast(Callable[[MigState, MigState], None], callback)
    one = cast(Callable[[MigState], None], callback)
    return lambda _old, new: one(new)


class WriteBuffer(Protocol):
    """The optional zero-copy write path of `MigrationCallbacks` (both methods or none).

    ``write_buffer(size)`` returns a writable view of at least ``size`` bytes where the
    next ``size`` bytes of the stream go (only the first ``size`` are written), or None
    to get this write through ``write_data`` instead. ``write_commit(size)`` says that the
    view now holds them: they are part of the stream from then on. Between the two the
    view belongs to the server; a write that is never committed was torn (see the module
    docstring). Fail either with ``OSError(errno, text)``: the client gets that errno and
    nothing of the write is committed.
    """

    def write_buffer(self, size: int) -> memoryview | None: ...

    def write_commit(self, size: int) -> None: ...


class Migration:
    """The migration state of one device (outlives its connections)."""

    def __init__(
        self,
        callbacks: MigrationCallbacks,
        *,
        flags: int = MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
    ) -> None:
        self.callbacks = callbacks
        self.flags = flags
        self.state = MigState.RUNNING
        self.transition = two_state_transition(callbacks.transition)
        has = callable(getattr(callbacks, "write_buffer", None))
        if has != callable(getattr(callbacks, "write_commit", None)):
            raise TypeError("migration callbacks need both write_buffer and write_commit")
        #: The emulator's zero-copy write path, if it has one.
        self.buffer = cast(WriteBuffer, callbacks) if has else None

    @property
    def stopped(self) -> bool:
        """STOP or STOP_COPY: only region access, features and MIG_DATA_READ run."""
        return self.state in _STOPPED

    def set_state(self, raw: int) -> None:
        """Walk to the state ``raw`` (wire value), calling ``transition`` per arc."""
        if raw not in MigState._value2member_map_:
            raise OSError(errno.EINVAL, f"migration state {raw} is unknown")
        target = MigState(raw)
        while self.state != target:
            step = _fsm.next_step(self.state, target)
            if step is None:
                raise OSError(
                    errno.EINVAL,
                    f"migration state {self.state.name} -> {target.name} is not allowed",
                )
            try:
                self.transition(self.state, step)
            except OSError as exc:
                raise emulator_error(exc, f"transition {self.state.name} -> {step.name}") from None
            self.state = step

    def read(self, size: int) -> Buffer:
        if self.state not in (MigState.PRE_COPY, MigState.STOP_COPY):
            raise OSError(errno.EINVAL, f"mig data read in {self.state.name}")
        try:
            data = self.callbacks.read_data(size)
        except OSError as exc:
            raise emulator_error(exc, f"read_data({size}) in {self.state.name}") from None
        if len(data) > size:
            raise OSError(errno.EINVAL, f"read_data returned {len(data)} bytes (max {size})")
        return data

    def write(self, data: memoryview) -> None:
        self._check_resuming()
        try:
            taken = self.callbacks.write_data(data)
        except OSError as exc:
            raise emulator_error(exc, f"write_data of {len(data)} bytes") from None
        if taken != len(data):
            raise OSError(errno.EINVAL, f"write_data took {taken} of {len(data)} bytes")

    def _check_resuming(self) -> None:
        if self.state != MigState.RESUMING:
            raise OSError(errno.EINVAL, f"mig data write in {self.state.name}")

    def write_target(self, size: int) -> memoryview | None:
        """The first ``size`` bytes of the emulator's `WriteBuffer` view (None: it has none,
        or wants this write through ``write_data``)."""
        self._check_resuming()
        if self.buffer is None:
            return None
        try:
            view = self.buffer.write_buffer(size)
        except OSError as exc:
            raise emulator_error(exc, f"write_buffer({size})") from None
        if view is None:
            return None
        if view.readonly or not view.c_contiguous or view.nbytes < size:
            raise OSError(
                errno.EINVAL,
                f"write_buffer gave a {'read-only ' if view.readonly else ''}view of "
                f"{view.nbytes} bytes (need {size} writable)",
            )
        return view.cast("B")[:size]

    def commit(self, size: int) -> None:
        """The view `write_target` gave holds the next ``size`` bytes of the stream."""
        assert self.buffer is not None
        try:
            self.buffer.write_commit(size)
        except OSError as exc:
            raise emulator_error(exc, f"write_commit({size})") from None

    def reset(self) -> None:
        """Back to RUNNING without arcs (DEVICE_RESET; libvfio-user does the same)."""
        self.state = MigState.RUNNING
