"""The fuzz targets in CI: the kept corpus replays clean, and a short seeded mutation run
of every target finds nothing. Longer runs: ``python -m fuzz --seconds N`` (RELIABILITY.md).

The vfio_user_connection target is shown to catch planted bugs in the server's connection
(a reply skipped, a write committed before its body arrived, a torn write not reset).

The framer target runs every implementation of the core on the same input and compares
their events and error text, so these tests cover the C core too (and under ASan/UBSan in
test_native_build.py, which replays the corpus with the sanitized build).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import vfiomig._core as core
from fuzz.engine import fuzz, load_corpus
from fuzz.seeds import SEEDS
from fuzz.targets import TARGETS, fuzz_control, fuzz_framer
from fuzz.vfio_user_server import FuzzBug
from vfiomig.vfio_user.server._connection import Connection
from vfiomig.vfio_user.server._dirty import DirtyLog
from vfiomig.vfio_user.server._migration import Migration


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays_clean(target: str) -> None:
    corpus = load_corpus(target)
    assert len(corpus) >= len(SEEDS[target]())  # the seeds are kept in the repository
    for data in corpus:
        TARGETS[target](data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeded_mutation_run_finds_nothing(target: str) -> None:
    # A fixed number of runs, not a time slice: the same inputs on a loaded machine as on
    # an idle one (a 2 s slice reached fewer than 100 runs under load). The time limit is
    # only a bound.
    result = fuzz(target, TARGETS[target], seconds=120.0, seed=20240607, max_runs=300)
    assert result.runs == 300
    assert not result.crashes, result.crashes[:3]


def test_framer_target_compares_implementations() -> None:
    # The differential check is live: a framer that reports other events is caught.
    class Liar:
        NEED_DATA = core.NEED_DATA

        def __init__(self, **kw: object) -> None:
            self._inner = core.IMPLEMENTATIONS["python"].Framer(**kw)
            self.current = None

        def feed(self, data: bytes) -> None:
            self._inner.feed(data)

        def next_event(self) -> object:
            self._inner.next_event()
            return core.ChannelEnd()

    import types

    liar = types.SimpleNamespace(Framer=Liar, NEED_DATA=core.NEED_DATA)
    impls = {"python": core.IMPLEMENTATIONS["python"], "liar": liar}
    with pytest.raises(FuzzBug, match="implementations differ"):
        fuzz_framer(load_corpus("framer")[0], impls)  # type: ignore[arg-type]


def test_control_target_accounts_for_every_fd() -> None:
    for data in load_corpus("control"):
        fuzz_control(data)


def _caught(target: str) -> list[str]:
    """The FuzzBug texts the kept corpus of ``target`` raises."""
    found = []
    for data in load_corpus(target):
        try:
            TARGETS[target](data)
        except FuzzBug as exc:
            found.append(str(exc))
    return found


def test_connection_target_catches_a_skipped_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = Connection._answer
    calls = itertools.count()

    async def skipping(self: Connection, *args: Any, **kwargs: Any) -> None:
        if next(calls) != 3:
            await answer(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "_answer", skipping)
    assert any("replies differ" in text for text in _caught("vfio_user_connection"))


def test_connection_target_catches_a_commit_before_the_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, commit = Migration.write_target, Migration.commit

    def early(self: Migration, size: int) -> memoryview | None:
        view = target(self, size)
        if view is not None:
            commit(self, size)  # before a byte of the body was received into it
        return view

    monkeypatch.setattr(Migration, "write_target", early)
    monkeypatch.setattr(Migration, "commit", lambda self, size: None)
    # The body then lands in bytes already committed.
    assert any("changed after the commit" in text for text in _caught("vfio_user_connection"))


def test_connection_target_catches_a_torn_write_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Connection, "_torn", lambda self, got, size: None)
    assert any("emulator log differs" in text for text in _caught("vfio_user_connection"))


@pytest.mark.parametrize("bug", ["straddle", "spread", "clear"])
def test_dirty_target_catches_a_wrong_report(monkeypatch: pytest.MonkeyPatch, bug: str) -> None:
    take = DirtyLog.take

    def planted(self: DirtyLog, start: int, length: int, pgsize: int) -> bytes:
        if bug == "straddle":  # a region not aligned to the logging page taken as aligned
            return take(self, start - start % self.pgsize, length, pgsize)
        if bug == "spread" and pgsize < self.pgsize:  # small pages reported as large ones
            got = take(self, start, length, pgsize)
            return got[:1] + bytes(len(got) - 1)
        if bug == "clear":  # reported pages stay dirty
            chunks = {i: c.copy() for i, c in self.chunks.items()}
            got = take(self, start, length, pgsize)
            self.chunks = chunks
            return got
        return take(self, start, length, pgsize)

    monkeypatch.setattr(DirtyLog, "take", planted)
    assert any("report" in text for text in _caught("vfio_user_dirty"))
