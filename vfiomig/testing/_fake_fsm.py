"""The kernel's migration FSM as the fake device walks it (``drivers/vfio/vfio_main.c``).

`next_state` is ``vfio_mig_get_next_state``: the next arc of the path the kernel takes
from one state to another, skipping optional states the device lacks (``flags``: the
VFIO_MIGRATION_* bits) and never passing *through* a saving state.
"""

from __future__ import annotations

from vfiomig.vfio._uapi import (
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    MigState,
)

S = MigState
E, STOP, RUN, SC, RES, P2P, PC, PCP = (
    S.ERROR,
    S.STOP,
    S.RUNNING,
    S.STOP_COPY,
    S.RESUMING,
    S.RUNNING_P2P,
    S.PRE_COPY,
    S.PRE_COPY_P2P,
)

#: ``vfio_from_fsm_table`` of drivers/vfio/vfio_main.c: [current][target] -> next step.
_FSM_TABLE: dict[MigState, dict[MigState, MigState]] = {
    STOP: {STOP: STOP, RUN: P2P, PC: P2P, PCP: P2P, SC: SC, RES: RES, P2P: P2P, E: E},
    RUN: {STOP: P2P, RUN: RUN, PC: PC, PCP: P2P, SC: P2P, RES: P2P, P2P: P2P, E: E},
    PC: {STOP: RUN, RUN: RUN, PC: PC, PCP: PCP, SC: PCP, RES: RUN, P2P: RUN, E: E},
    PCP: {STOP: P2P, RUN: P2P, PC: PC, PCP: PCP, SC: SC, RES: P2P, P2P: P2P, E: E},
    SC: {STOP: STOP, RUN: STOP, PC: E, PCP: E, SC: SC, RES: STOP, P2P: STOP, E: E},
    RES: {STOP: STOP, RUN: STOP, PC: STOP, PCP: STOP, SC: STOP, RES: RES, P2P: STOP, E: E},
    P2P: {STOP: STOP, RUN: RUN, PC: RUN, PCP: PCP, SC: STOP, RES: STOP, P2P: P2P, E: E},
    E: dict.fromkeys(S, E),
}

#: ``state_flags_table``: the VFIO_MIGRATION_* bits a state needs (ERROR: never allowed).
_STATE_FLAGS: dict[MigState, int] = {
    STOP: VFIO_MIGRATION_STOP_COPY,
    RUN: VFIO_MIGRATION_STOP_COPY,
    PC: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
    PCP: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
    SC: VFIO_MIGRATION_STOP_COPY,
    RES: VFIO_MIGRATION_STOP_COPY,
    P2P: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
    E: 0xFFFFFFFF,
}

SAVING = frozenset({SC, PC, PCP})


def _supported(state: MigState, flags: int) -> bool:
    return _STATE_FLAGS[state] & flags == _STATE_FLAGS[state]


def next_state(cur: int, new: int, flags: int) -> MigState | None:
    """The next arc of the kernel's path from ``cur`` to ``new`` (``vfio_mig_get_next_state``).

    ``None`` where the kernel answers EINVAL: a state outside the enum, a state the device
    does not support (``flags``: VFIO_MIGRATION_* bits), ERROR, or a blocked transition.
    """
    try:
        cur_s, new_s = S(cur), S(new)
    except ValueError:
        return None
    if not _supported(cur_s, flags) or not _supported(new_s, flags):
        return None
    step = _FSM_TABLE[cur_s][new_s]
    # ERROR in the table means "no path" (blocked); it is never a state to skip over.
    while step is not E and not _supported(step, flags):
        step = _FSM_TABLE[step][new_s]
    return None if step is E else step


def path(cur: int, new: int, flags: int) -> list[MigState] | None:
    """Every state the kernel passes through from ``cur`` to ``new`` (``new`` included)."""
    out: list[MigState] = []
    while cur != new:
        step = next_state(cur, new, flags)
        if step is None:
            return None
        out.append(step)
        cur = step
    return out
