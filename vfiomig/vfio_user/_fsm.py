"""The vfio-user migration state machine: direct arcs and the next step towards a target.

The tables are libvfio-user's (``lib/migration.c``), which follow the spec: RUNNING_P2P
and PRE_COPY_P2P are not used in vfio-user, ERROR is never a target, STOP_COPY never
goes back to PRE_COPY, and an indirect request takes the shortest path of direct arcs
that does not pass *through* a saving state. The server walks that path one arc at a
time; the client walks it too, so that it also works with a server that only accepts
direct arcs.
"""

from __future__ import annotations

from typing import Final

from vfiomig.vfio_user._migration_bodies import MigState

S = MigState

#: from -> the states reachable in one arc.
DIRECT_ARCS: Final[dict[MigState, frozenset[MigState]]] = {
    S.ERROR: frozenset(),
    S.STOP: frozenset({S.RUNNING, S.STOP_COPY, S.RESUMING}),
    S.RUNNING: frozenset({S.STOP, S.PRE_COPY}),
    S.STOP_COPY: frozenset({S.STOP}),
    S.RESUMING: frozenset({S.STOP}),
    S.RUNNING_P2P: frozenset(),
    S.PRE_COPY: frozenset({S.RUNNING, S.STOP_COPY}),
    S.PRE_COPY_P2P: frozenset(),
}

# (from, to) -> the next state on the way; absent pairs are not allowed.
_NEXT: Final[dict[tuple[MigState, MigState], MigState]] = {
    (S.STOP, S.STOP): S.STOP,
    (S.STOP, S.RUNNING): S.RUNNING,
    (S.STOP, S.STOP_COPY): S.STOP_COPY,
    (S.STOP, S.RESUMING): S.RESUMING,
    (S.STOP, S.PRE_COPY): S.RUNNING,
    (S.RUNNING, S.STOP): S.STOP,
    (S.RUNNING, S.RUNNING): S.RUNNING,
    (S.RUNNING, S.STOP_COPY): S.STOP,
    (S.RUNNING, S.RESUMING): S.STOP,
    (S.RUNNING, S.PRE_COPY): S.PRE_COPY,
    (S.STOP_COPY, S.STOP): S.STOP,
    (S.STOP_COPY, S.RUNNING): S.STOP,
    (S.STOP_COPY, S.STOP_COPY): S.STOP_COPY,
    (S.STOP_COPY, S.RESUMING): S.STOP,
    (S.RESUMING, S.STOP): S.STOP,
    (S.RESUMING, S.RUNNING): S.STOP,
    (S.RESUMING, S.STOP_COPY): S.STOP,
    (S.RESUMING, S.RESUMING): S.RESUMING,
    (S.RESUMING, S.PRE_COPY): S.STOP,
    (S.PRE_COPY, S.STOP): S.RUNNING,
    (S.PRE_COPY, S.RUNNING): S.RUNNING,
    (S.PRE_COPY, S.STOP_COPY): S.STOP_COPY,
    (S.PRE_COPY, S.RESUMING): S.RUNNING,
    (S.PRE_COPY, S.PRE_COPY): S.PRE_COPY,
}


def next_step(current: MigState, target: MigState) -> MigState | None:
    """The next state on the way from ``current`` to ``target``; None if not allowed."""
    return _NEXT.get((current, target))


def path(current: MigState, target: MigState) -> list[MigState] | None:
    """Every state entered on the way to ``target`` (empty if already there), or None."""
    steps: list[MigState] = []
    while current != target:
        step = next_step(current, target)
        if step is None:
            return None
        steps.append(step)
        current = step
    return steps if next_step(target, target) is not None else None
