"""``vfiomig bench`` itself: plan the runs, run them (more repeats where the spread hides
the answer), then say what they show, in the table, the advice, bench.json and the plots,
all from the same summaries."""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vfiomig._logs import event

from ._advice import advice_lines, advise, groups, limit, needs_more
from ._cref import cref_reason, load_cref, run_cref
from ._plan import (
    QEMU_CONFIG_SECONDS,
    QEMU_DEVICE_BW,
    QEMU_SIZE,
    Plan,
    describe_models,
    plan,
    plural,
)
from ._report import WIDTH, Progress, summarise, table, write_csv, write_json
from ._runner import Case, Models, Run, run_sequential, run_vfiomig, seeds
from ._verdict import qemu_table

log = logging.getLogger("vfiomig.bench")

Job = tuple[str, Case]


def _jobs(args: argparse.Namespace, p: Plan, cref: Any, notes: list[str]) -> list[Job]:
    jobs: list[Job] = []
    seq_done: set[tuple[Any, ...]] = set()
    for case in p.cases:
        jobs.append(("vfiomig", case))
        key = (case.packet_size, case.devices, case.size, case.transport, case.sink)
        if not args.no_seq and key not in seq_done:
            seq_done.add(key)
            jobs.append(("seq", case))
        if cref is not None:
            why = cref_reason(case, p.models)
            if why is None:
                jobs.append(("cref", case))
            elif case.sink != "device":
                notes.append(f"C reference skipped for {case.label}: {why}")
    return jobs


async def _run(kind: str, case: Case, models: Models, cref: Any, r: int, seed: int,
               progress: Progress) -> Run:  # fmt: skip
    progress.start(f"{kind} {case.label}")
    if kind == "vfiomig":
        run = await run_vfiomig(case, models, r, seed, progress.tick)
    elif kind == "seq":
        run = await run_sequential(case, models, r, seed, progress.tick)
    else:
        run = await run_cref(cref, case, models, r, seed)
    progress.finish_run(run)
    return run


def _wanted_again(runs: list[Run], jobs: list[Job]) -> list[Job]:
    """The vfiomig jobs of the groups whose answer more repeats could change or firm up."""
    unsure = {k for k, rows in groups(summarise(runs)).items() if needs_more(rows)}
    return [
        (kind, c) for kind, c in jobs
        if kind == "vfiomig"
        and (c.sink, c.devices, c.size, c.packet_size, c.order, c.transport) in unsure
    ]  # fmt: skip


async def _measure(args: argparse.Namespace, p: Plan, jobs: list[Job], cref: Any) -> list[Run]:
    """Every job ``least`` times, in rounds (so that drift spreads over every cell), then
    more rounds of the groups that need them, up to ``most``."""
    least, most = p.repeats
    progress = Progress(len(jobs) * least)
    runs: list[Run] = []
    for r, seed in seeds(args.seed, most):
        todo = jobs if r < least else _wanted_again(runs, jobs)
        if not todo:
            break
        if r >= least:
            progress.total += len(todo)
        for kind, case in todo:
            runs.append(await _run(kind, case, p.models, cref, r, seed, progress))
    progress.close()
    return runs


def _repeats_text(p: Plan) -> str:
    least, most = p.repeats
    if least == most:
        return f"repeats: {plural(least, 'run')} per cell"
    return (
        f"repeats: {least} per cell, up to {most} where the spread hid the answer (--repeats auto)"
    )


async def run_bench(args: argparse.Namespace, out: Path) -> int:
    """The matrix and qemu scenarios: run, report, advise, plot."""
    from ._plots import make_plots

    p = plan(args)
    cref = load_cref() if args.cref and not args.no_cref else None
    notes = [f"skipped {c.label}: {why}" for c, why in p.skipped]
    if cref is None and args.cref:
        notes.append("C reference: benchmarks/cref not found, baseline skipped")
    jobs = _jobs(args, p, cref, notes)
    t_start = time.perf_counter()
    runs = await _measure(args, p, jobs, cref)
    wall = time.perf_counter() - t_start
    t0 = time.perf_counter()
    summaries = summarise(runs)
    cpus = os.cpu_count() or 1
    for s in summaries:
        if s["kind"] == "vfiomig" and s["ok"]:
            s["limit"], s["limit_why"] = limit(s, cpus)
    models_text = describe_models(p.models, {c.sink for c in p.cases})
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    header = [
        f"models: {models_text[0]}",
        f"        {models_text[1]}",
        _repeats_text(p),
        f"host: {plural(cpus, 'CPU')}, load average {load} (before the output)",
    ]
    advice = advise(summaries, cpus, p.models.link_rate)
    meta: dict[str, Any] = {
        "command": "vfiomig " + " ".join(sys.argv[1:]) if sys.argv else "vfiomig bench",
        "scenario": args.scenario,
        "time_scale": p.scale,
        "models": {
            "device_bandwidth": p.models.device_bandwidth,
            "write_latency": p.models.write_latency,
            "config_seconds": p.models.config_seconds,
            "channel_rate": p.models.channel_rate,
            "link_rate": p.models.link_rate,
            "slow_rate": p.models.slow_rate,
            "max_queued": p.models.max_queued,
        },
        "models_text": models_text,
        "repeats": {"least": p.repeats[0], "most": p.repeats[1], "text": _repeats_text(p)},
        "seed": args.seed,
        "processes": "receiver in the bench process (trio); sender in a child process"
        " (python -m vfiomig.bench._sendproc); C reference: both ends in child processes."
        " CPU per process from /proc/PID/task/*/schedstat (vfiomig.bench._cpu)",
        "host": {
            "cpus": cpus,
            "python": platform.python_version(),
            "uname": platform.platform(),
            "loadavg": os.getloadavg(),
        },
        "wall_seconds": wall,
        "notes": notes,
        "advice": [asdict(a) for a in advice],
    }
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, after the runs
    write_csv(out / "runs.csv", runs)
    print(table(summaries, header))
    ok = [r for r in runs if r.ok and r.kind != "cref"]
    frac = max((r.harness_seconds / r.downtime for r in ok), default=math.nan)
    report_seconds = time.perf_counter() - t0
    meta["harness"] = {
        "max_fraction_of_run": frac,
        "summary_seconds": report_seconds,
        "how": "time in harness code inside the receiver process during a run over that"
        " run's downtime: device-model bookkeeping and progress ticks (perf_counter, so"
        " preemption on a busy machine counts too), CPU sampling (its CPU time)",
    }
    print(f"harness overhead: at most {frac * 100:.3f}% of a run (goal < 2%)")
    print(f"statistics and output {report_seconds * 1000:.0f} ms after {wall:.1f} s of runs")
    lines = advice_lines(advice)
    if lines:
        print("\n".join(lines))
    qemu = None
    if args.scenario == "qemu":
        qemu = _qemu_note(summaries, p.models, p.scale, meta)
    for note in notes:
        log.warning("%s", note, extra=event("bench_note"))
    if args.no_plots:
        meta["plots"] = "plots skipped: --no-plots"
    else:
        plots = make_plots(summaries, out, models_text, advice, qemu)
        meta["plots"] = plots if isinstance(plots, str) else [str(x) for x in plots]
        print(plots if isinstance(plots, str) else "plots: " + ", ".join(str(x) for x in plots))
    write_json(out / "bench.json", meta, runs, summaries)
    print(f"wrote {out / 'runs.csv'} and {out / 'bench.json'}")
    return 0 if all(r.ok for r in runs) else 1


def _qemu_note(
    summaries: list[Any], models: Models, scale: float, meta: dict[str, Any]
) -> dict[str, Any]:
    lines = [
        f"QEMU-shaped scenario: 4 devices x 100 MiB, device {models.device_bandwidth / 2**20:.1f}"
        f" MiB/s, config {models.config_seconds * 1000:.0f} ms (QEMU's figures with time"
        f" x{scale:g})",
    ]
    table_lines, meta["qemu"] = qemu_table(summaries, scale)
    bound_unscaled = QEMU_SIZE / QEMU_DEVICE_BW + QEMU_CONFIG_SECONDS
    meta["qemu"]["bound_unscaled_ms"] = bound_unscaled * 1000
    lines += table_lines
    lines.append(
        f"  (on QEMU's own scale the device model's bound is {bound_unscaled * 1000:.0f} ms;"
        " QEMU's downtimes include more than device state: compare the shape, not the values)"
    )
    print("\n".join(textwrap.fill(ln, WIDTH, subsequent_indent="  ") for ln in lines))
    q: dict[str, Any] = meta["qemu"]
    return q


async def bench_main(args: argparse.Namespace) -> int:
    """Run ``vfiomig bench`` (``vfiomig.cli._main.main`` calls it under ``trio.run``)."""
    # The per-run lines are the bench's progress off a terminal: shown without -v.
    log.setLevel(min(logging.INFO, logging.getLogger("vfiomig").getEffectiveLevel()))
    if args.scenario == "precopy":
        from ._precopy import run_precopy_bench

        return await run_precopy_bench(args, Path(args.out))
    return await run_bench(args, Path(args.out))


__all__ = ["bench_main", "run_bench"]
