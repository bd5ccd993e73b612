"""The server's migration state machine calls ``transition`` in either form, per arc."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from vfiomig.vfio_user import MigState
from vfiomig.vfio_user.server._migration import Migration

S = MigState


class Base:
    def read_data(self, size: int) -> bytes:
        return b""

    def write_data(self, data: memoryview) -> int:
        return len(data)


class TwoStates(Base):
    def __init__(self) -> None:
        self.arcs: list[tuple[MigState, MigState]] = []

    def transition(self, old: MigState, new: MigState) -> None:
        self.arcs.append((old, new))


class OneState(Base):
    def __init__(self) -> None:
        self.arcs: list[Any] = []
        self.migration: Migration | None = None

    def transition(self, state: MigState, extra: int = 0) -> None:  # optional extras: one-state
        assert self.migration is not None
        self.arcs.append((self.migration.state, state))  # the old state, during the call


class Star(Base):
    def __init__(self) -> None:
        self.arcs: list[tuple[Any, ...]] = []

    def transition(self, *states: MigState) -> None:
        self.arcs.append(states)


@pytest.mark.parametrize("kind", [TwoStates, OneState, Star])
def test_each_arc_reaches_the_callback_with_both_states(kind: type[Any]) -> None:
    callbacks = kind()
    migration = Migration(callbacks)
    if isinstance(callbacks, OneState):
        callbacks.migration = migration
    migration.set_state(S.RESUMING)  # RUNNING -> STOP -> RESUMING
    migration.set_state(S.RUNNING)  # RESUMING -> STOP -> RUNNING
    assert callbacks.arcs == [
        (S.RUNNING, S.STOP),
        (S.STOP, S.RESUMING),
        (S.RESUMING, S.STOP),
        (S.STOP, S.RUNNING),
    ]


def test_a_failing_arc_leaves_the_last_state_that_worked() -> None:
    class Refuses(TwoStates):
        def transition(self, old: MigState, new: MigState) -> None:
            if old == S.RESUMING:
                raise OSError(errno.EINVAL, "state of 3 bytes")
            super().transition(old, new)

    migration = Migration(Refuses())
    migration.set_state(S.RESUMING)
    with pytest.raises(OSError, match="state of 3 bytes"):
        migration.set_state(S.RUNNING)
    assert migration.state == S.RESUMING
