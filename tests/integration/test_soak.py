"""The CI part of the soak (tests/soak.py): 60 back-to-back sessions in this process with
faults drawn at random (seeded); every outcome right, open fds and RSS flat."""

from __future__ import annotations

from tests.soak import soak, summarize


async def test_soak_sixty_sessions_with_random_faults() -> None:
    rows, samples = await soak(60, seed=20240607)
    table, good = summarize(rows, samples)
    assert good, table
    assert {r.fault for r in rows} >= {"none", "eio", "missing", "second-config", "stall"}
    assert {r.sink for r in rows} == {"memory", "vfio", "vfio-user"}
