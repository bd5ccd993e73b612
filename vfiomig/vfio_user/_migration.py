"""Migration v2 on the server: the device state machine and the MIG_DATA_* rules.

The state starts RUNNING and changes through DEVICE_FEATURE SET MIG_DEVICE_STATE, one
direct arc at a time along libvfio-user's paths (`_fsm`; libvfio-user has no P2P
states, nor do we); each arc calls the emulator's ``transition``; if that fails the state
stays at the last arc that worked. MIG_DATA_READ is served in PRE_COPY and STOP_COPY,
MIG_DATA_WRITE in RESUMING (EINVAL otherwise); a write the emulator takes only part of is
EINVAL ("partial writes are not supported").
"""

from __future__ import annotations

import errno
from typing import Protocol

from vfiomig.vfio_user import _fsm
from vfiomig.vfio_user._messages import MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, MigState

Buffer = bytes | bytearray | memoryview
_STOPPED = frozenset({MigState.STOP, MigState.STOP_COPY})


class MigrationCallbacks(Protocol):
    """libvfio-user's ``vfu_migration_callbacks_t``; fail with ``OSError(errno, text)``.

    ``transition`` gets each state entered, one arc at a time. ``read_data`` returns at
    most ``size`` bytes (empty at the end of the stream). ``write_data`` gets a view of
    the received bytes (valid during the call only, no copy made) and returns how many it
    took: all of them, or the write fails.
    """

    def transition(self, state: MigState) -> None: ...

    def read_data(self, size: int) -> Buffer: ...

    def write_data(self, data: memoryview) -> int: ...


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
            self.callbacks.transition(step)
            self.state = step

    def read(self, size: int) -> Buffer:
        if self.state not in (MigState.PRE_COPY, MigState.STOP_COPY):
            raise OSError(errno.EINVAL, f"mig data read in {self.state.name}")
        data = self.callbacks.read_data(size)
        if len(data) > size:
            raise OSError(errno.EINVAL, f"read_data returned {len(data)} bytes (max {size})")
        return data

    def write(self, data: memoryview) -> None:
        if self.state != MigState.RESUMING:
            raise OSError(errno.EINVAL, f"mig data write in {self.state.name}")
        taken = self.callbacks.write_data(data)
        if taken != len(data):
            raise OSError(errno.EINVAL, f"write_data took {taken} of {len(data)} bytes")

    def reset(self) -> None:
        """Back to RUNNING without arcs (DEVICE_RESET; libvfio-user does the same)."""
        self.state = MigState.RUNNING
