"""Stateful property tests of the reorder buffer with the shared budget and the gate.

Hypothesis drives two devices sharing one `Budget` through any interleaving of offers
(in any order, with duplicates, gaps, bad versions, the invalid idx, second config
packets, data above the config idx), deliveries, gate openings, precopy, and a loader
that takes a batch and reports it written later (as the real loader does across its
``await sink.write``). After every step:

- the loader has received each device's data in idx order, each packet once, so what it
  wrote is always a prefix of the device's stream (precopy first);
- queued bytes stay within the budget plus the slack the design allows: per device, one
  packet (the next idx, accepted over budget only while the loader has nothing of the
  device unwritten; SPEC.md §2), its config packet, and its precopy data until written;
- an offer is refused only when the budget has no room and the packet is not a config
  packet, nor the next idx while the loader is idle;
- every failure is our `VfioMigError`, and the buffer is poisoned after it.

At the end each device that did not fail is driven to completion, which must succeed
with exactly its stream written. Runs against every implementation of the core.
"""

from __future__ import annotations

import types

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

import vfiomig._core as core_module
from vfiomig._core import Ready, ReorderBuffer, VfioMigError
from vfiomig._core._wire import VFIO_IDX_INVALID, wrap_config

MAX_PACKET = 40


class _Dev:
    def __init__(self, buf: ReorderBuffer, sizes: list[int]) -> None:
        self.buf = buf
        self.sizes = sizes  # data idx 0..N-1; config idx N
        self.n = len(sizes)
        self.offered: set[int] = set()  # accepted offers
        self.written = bytearray()  # what the loader wrote (precopy and data, in order)
        self.expected_precopy = bytearray()
        self.taken: Ready | None = None  # a batch taken, not yet written
        self.multifd_taken = False
        self.config_offered = False
        self.config_idx: int | None = None
        self.undelivered: set[int] = set()
        self.max_data = -1
        self.failed = False
        self.loaded = False
        self.precopy_queued = 0

    def data(self, idx: int) -> bytes:
        # Data idx at or above N (the peer claims a longer stream) carry 5 bytes.
        return bytes([(idx * 7 + 3) % 251]) * (self.sizes[idx] if idx < self.n else 5)

    def stream(self) -> bytes:
        """The stream the peer has described so far: up to its config idx when known."""
        end = self.config_idx if self.config_idx is not None else max(self.n, self.max_data + 1)
        return bytes(self.expected_precopy) + b"".join(self.data(i) for i in range(end))


def _machine(impl: types.ModuleType) -> type[RuleBasedStateMachine]:
    class ReorderMachine(RuleBasedStateMachine):
        inflight = Bundle("inflight")

        @rule(
            limit=st.integers(0, 4 * MAX_PACKET),
            sizes=st.tuples(
                st.lists(st.integers(0, MAX_PACKET), max_size=8),
                st.lists(st.integers(0, MAX_PACKET), max_size=8),
            ),
        )
        @precondition(lambda self: not hasattr(self, "devs"))
        def setup(self, limit: int, sizes: tuple[list[int], list[int]]) -> None:
            self.budget = impl.Budget(limit)
            self.devs = [
                _Dev(impl.ReorderBuffer(f"dev{i}/0", self.budget), s) for i, s in enumerate(sizes)
            ]

        def ready(self) -> bool:
            return hasattr(self, "devs")

        # -- ingress ---------------------------------------------------------------

        @precondition(ready)
        @rule(
            target=inflight,
            d=st.integers(0, 1),
            which=st.integers(0, 11),
            kind=st.sampled_from(["data", "data", "data", "config", "badversion", "invalid"]),
        )
        def offer(self, d: int, which: int, kind: str) -> object:
            dev = self.devs[d]
            buf = dev.buf
            idx = VFIO_IDX_INVALID if kind == "invalid" else which
            is_config = kind == "config"
            if is_config and which < 8:
                idx = dev.n  # mostly the right config idx; sometimes another one
            if kind == "data" and idx >= dev.n:
                idx = dev.n + (which % 3)  # the config idx or just above: both errors
            size = len(wrap_config(b"c")) if is_config else (dev.sizes[idx] if idx < dev.n else 5)
            version = 1 if kind == "badversion" else 0
            expect_error = (
                dev.failed
                or version != 0
                or idx == VFIO_IDX_INVALID
                or idx < buf.next_idx
                or idx in dev.offered
                or (is_config and (dev.config_offered or idx < dev.max_data))
                or (not is_config and dev.config_idx is not None and idx > dev.config_idx)
            )
            queued_before = self.budget.queued
            try:
                ok = buf.offer(version, idx, 1 if is_config else 0, size)
            except VfioMigError as exc:
                assert expect_error, f"unexpected {exc}"
                self._failed(dev)
                return None
            assert not expect_error, f"offer({idx}, {kind}) accepted"
            if not ok:
                assert not is_config and (idx != buf.next_idx or dev.taken is not None)
                assert queued_before + size > self.budget.limit
                return None
            dev.offered.add(idx)
            dev.undelivered.add(idx)
            if is_config:
                dev.config_offered = True
                dev.config_idx = idx
            else:
                dev.max_data = max(dev.max_data, idx)
            return (d, idx, is_config, size)

        @precondition(ready)
        @rule(item=consumes(inflight), bad=st.booleans())
        def deliver(self, item: tuple[int, int, bool, int] | None, bad: bool) -> None:
            if item is None:
                return
            d, idx, is_config, _size = item
            dev = self.devs[d]
            dev.undelivered.discard(idx)
            if is_config:
                data = wrap_config(b"c")
                if bad:
                    data = data[:-1] + b"\0"
            else:
                data = dev.data(idx)
            try:
                dev.buf.deliver(idx, data)
            except VfioMigError:
                assert dev.failed or (is_config and bad)
                self._failed(dev)

        @precondition(ready)
        @rule(d=st.integers(0, 1))
        def open_gate(self, d: int) -> None:
            self.devs[d].buf.open_gate()

        @precondition(ready)
        @rule(d=st.integers(0, 1), data=st.binary(max_size=20))
        def precopy(self, d: int, data: bytes) -> None:
            dev = self.devs[d]
            try:
                dev.buf.add_precopy(data)
            except VfioMigError:
                assert dev.failed or dev.multifd_taken
                self._failed(dev)
                return
            assert not dev.failed and not dev.multifd_taken
            dev.expected_precopy += data
            dev.precopy_queued += len(data)

        @precondition(ready)
        @rule(d=st.integers(0, 1))
        def sink_fails(self, d: int) -> None:
            dev = self.devs[d]
            if not dev.loaded:
                dev.buf.fail(VfioMigError(f"dev{d}/0: sink failed", device=f"dev{d}/0"))
                self._failed(dev)

        # -- the loader ------------------------------------------------------------

        @precondition(ready)
        @rule(d=st.integers(0, 1))
        def loader_take(self, d: int) -> None:
            dev = self.devs[d]
            if dev.taken is not None or dev.failed:
                return
            try:
                ready = dev.buf.take_ready()
            except VfioMigError:
                assert dev.failed
                return
            if ready is None:
                return
            out = b"".join(bytes(c) for c in ready.chunks)
            assert len(out) == ready.nbytes
            if not ready.precopy:
                assert dev.buf.gate_open
                dev.multifd_taken = True
            dev.written += out
            assert dev.stream().startswith(bytes(dev.written)), "written out of order"
            dev.taken = ready

        @precondition(ready)
        @rule(d=st.integers(0, 1))
        def loader_written(self, d: int) -> None:
            dev = self.devs[d]
            if dev.taken is None:
                return
            dev.buf.written(dev.taken.nbytes)
            if dev.taken.precopy:
                dev.precopy_queued -= dev.taken.nbytes
            dev.taken = None
            if dev.buf.finishable:
                dev.buf.mark_loaded()
                dev.loaded = True
                assert bytes(dev.written) == dev.stream()

        def _failed(self, dev: _Dev) -> None:
            dev.failed = True
            assert dev.buf.error is not None
            with pytest.raises(VfioMigError):
                dev.buf.offer(0, 0, 0, 0)  # poisoned

        # -- invariants ------------------------------------------------------------

        @invariant()
        def within_budget(self) -> None:
            if not self.ready():
                return
            slack = 0
            for dev in self.devs:
                config = len(wrap_config(b"c")) if dev.config_offered else 0
                slack += MAX_PACKET + config + dev.precopy_queued
            assert self.budget.queued <= self.budget.limit + slack
            assert self.budget.queued >= 0

        @invariant()
        def written_is_a_prefix(self) -> None:
            if self.ready():
                for dev in self.devs:
                    assert dev.stream().startswith(bytes(dev.written))

        def teardown(self) -> None:
            if not self.ready():
                return
            # Liveness: a device that did not fail, whose packets are all within its
            # stream, completes once the rest come in idx order and its gate opens.
            for dev in self.devs:
                if dev.failed or dev.loaded or dev.max_data >= dev.n:
                    continue
                if dev.config_idx not in (None, dev.n):
                    continue  # config idx below some data idx to come: never completes
                buf = dev.buf
                buf.open_gate()
                if dev.taken is not None:
                    buf.written(dev.taken.nbytes)
                for idx in sorted(dev.undelivered):
                    buf.deliver(idx, wrap_config(b"c") if idx == dev.n else dev.data(idx))
                for idx in range(dev.n + 1):
                    if idx in dev.offered:
                        continue
                    data = wrap_config(b"c") if idx == dev.n else dev.data(idx)
                    while not buf.offer(0, idx, int(idx == dev.n), len(data)):
                        ready = buf.take_ready()
                        assert ready is not None, "refused with nothing to write: deadlock"
                        dev.written += b"".join(bytes(c) for c in ready.chunks)
                        buf.written(ready.nbytes)
                    buf.deliver(idx, data)
                while (ready := buf.take_ready()) is not None:
                    dev.written += b"".join(bytes(c) for c in ready.chunks)
                    buf.written(ready.nbytes)
                assert buf.finishable
                buf.mark_loaded()
                assert bytes(dev.written) == dev.stream()

    ReorderMachine.__name__ = f"ReorderMachine_{impl.IMPLEMENTATION}"
    return ReorderMachine


@pytest.mark.parametrize("name", sorted(core_module.IMPLEMENTATIONS))
def test_reorder_state_machine(name: str) -> None:
    machine = _machine(core_module.IMPLEMENTATIONS[name])
    machine.TestCase.settings = settings(
        max_examples=min(60, settings().max_examples * 2 // 5)
        if settings().max_examples <= 150
        else settings().max_examples,
        stateful_step_count=40,
        deadline=None,
    )
    machine.TestCase().runTest()
