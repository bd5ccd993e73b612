"""``enum vfio_device_mig_state``: the migration states shared by the kernel VFIO uAPI and
the vfio-user protocol (which carries the same values on the wire)."""

from __future__ import annotations

import enum


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state`` (not libvfio-user's local numbering)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


def state_name(state: int) -> str:
    """``"RESUMING"`` for 4; the number itself for a value outside the enum."""
    try:
        return MigState(state).name
    except ValueError:
        return str(state)
