"""`vfiomig.bench._runner`: a run whose sender fails ends with that error, promptly, for
the multifd receiver and for the sequential baseline alike."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from vfiomig.bench import _runner
from vfiomig.bench._runner import Case, Models, run_sequential, run_vfiomig

CASE = Case(
    channels=2,
    packet_size=64 << 10,
    devices=1,
    size=1 << 20,
    order="roundrobin",
    transport="tcp",
    sink="null",
)


async def _failing_sender(job: dict[str, Any], out: dict[str, Any]) -> None:
    await trio.sleep(0.05)  # the receiver is listening; nothing ever connects
    raise RuntimeError("sender exited 1: boom")


@pytest.mark.parametrize("run", [run_vfiomig, run_sequential])
async def test_a_failed_sender_fails_the_run(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    monkeypatch.setattr(_runner, "_sender", _failing_sender)
    with trio.fail_after(10):
        result = await run(CASE, Models(), 0, 1, lambda done, total: None)
    assert not result.ok
    assert "RuntimeError: sender exited 1: boom" in result.error
