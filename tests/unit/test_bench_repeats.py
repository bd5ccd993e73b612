"""``--repeats auto``: every cell 3 times, then more rounds only for the groups whose
spread hides the answer, never past ``--max-repeats`` (runs faked: no processes)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import trio

from vfiomig.bench import _command
from vfiomig.bench._plan import plan
from vfiomig.bench._report import Progress
from vfiomig.bench._runner import Case, Models, Run
from vfiomig.cli._main import build_parser


async def test_auto_repeats_go_where_the_spread_is(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["bench", "--channels", "1,2", "--devices", "1,2", "--sinks", "null", "--no-seq",
         "--max-repeats", "5"]
    )  # fmt: skip
    p = plan(args)
    assert p.repeats == (3, 5)

    async def fake_run(kind: str, case: Case, models: Models, cref: Any, r: int, seed: int,
                       progress: Progress) -> Run:  # fmt: skip
        await trio.lowlevel.checkpoint()
        # 1 device: tight repeats; 2 devices: 2 channels look 10 % faster, but each repeat
        # swings by 30 %, so the spread hides it.
        base = 1.0 / case.channels if case.devices == 1 else (1.0 if case.channels == 1 else 0.9)
        swing = 0.01 if case.devices == 1 else 0.3
        run = Run(kind, case, r, seed, ok=True, downtime=base * (1 + swing * ((r % 3) - 1)))
        run.throughput = run.bytes = 1
        return run

    monkeypatch.setattr(_command, "_run", fake_run)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    jobs = _command._jobs(args, p, None, [])
    runs = await _command._measure(args, p, jobs, None)
    per_cell: dict[tuple[int, int], int] = {}
    for run in runs:
        key = (run.case.devices, run.case.channels)
        per_cell[key] = per_cell.get(key, 0) + 1
    assert per_cell == {(1, 1): 3, (1, 2): 3, (2, 1): 5, (2, 2): 5}
