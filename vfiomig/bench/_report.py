"""Statistics over repeats (numpy), the terminal table, the progress bar, CSV and JSON.

A summary row is one (kind, case): min / median / max of each measure over its repeats.
Ratios against the baselines pair runs of the same repeat index from the same bench
invocation, then take the median of those ratios.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vfiomig._logs import event

from ._runner import Case, Run

#: The bench's own lines; `bench_main` lets its INFO through without -v.
log = logging.getLogger("vfiomig.bench")

MEASURES = (
    "downtime",
    "throughput",
    "bound",
    "efficiency",
    "peak_queued_bytes",
    "starved_seconds",
    "cpu_seconds",
    "harness_fraction",
)


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if a.size == 0:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}


def seq_key(case: Case) -> tuple[Any, ...]:
    return (case.packet_size, case.devices, case.size, case.transport, case.sink)


def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    """One summary per (kind, case), with baseline ratios on the vfiomig rows."""
    groups: dict[tuple[str, Case], list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.kind, run.case].append(run)
    seq: dict[tuple[Any, ...], dict[int, Run]] = defaultdict(dict)
    cref: dict[Case, dict[int, Run]] = defaultdict(dict)
    for run in runs:
        if run.ok and run.kind == "seq":
            seq[seq_key(run.case)][run.repeat] = run
        elif run.ok and run.kind == "cref":
            cref[run.case][run.repeat] = run
    out: list[dict[str, Any]] = []
    for (kind, case), group in groups.items():
        ok = [r for r in group if r.ok]
        rows = [r.row() for r in ok]
        summary: dict[str, Any] = {"kind": kind, **asdict(case), "runs": len(group)}
        summary["ok"] = len(ok)
        summary["errors"] = sorted({r.error for r in group if not r.ok})
        summary["bound_limit"] = ok[0].bound_limit if ok else ""
        for m in MEASURES:
            summary[m] = _stats([float(row[m]) for row in rows])
        if kind == "vfiomig":
            base = seq.get(seq_key(case), {})
            # How much faster than the sequential stream (downtime ratio, > 1 is better).
            summary["speedup_vs_seq"] = _stats(
                [base[r.repeat].downtime / r.downtime for r in ok if r.repeat in base]
            )["median"]
            ref = cref.get(case, {})
            # vfiomig's throughput as a fraction of the C reference's (1.0 = as fast as C).
            summary["throughput_vs_cref"] = _stats(
                [r.throughput / ref[r.repeat].throughput for r in ok if r.repeat in ref]
            )["median"]
        out.append(summary)
    return out


def _fmt(v: float, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if math.isnan(v) else f"{v * scale:.{digits}f}"


def table(summaries: list[dict[str, Any]]) -> str:
    """The terminal table: medians, with the efficiency's min-max."""
    head = (
        f"{'kind':7} {'ch':>3} {'packet':>6} {'dev':>3} {'size':>6} {'order':10} {'tr':4}"
        f" {'sink':13} {'downtime s':>10} {'MB/s':>7} {'bound s':>8} {'eff':>5} {'eff min-max':>11}"
        f" {'peakQ MiB':>9} {'starv s':>7} {'cpu s':>6} {'harn %':>6} {'xSeq':>5} {'/C':>5}"
    )
    lines = [head, "-" * len(head)]
    from ._runner import _size

    for s in summaries:
        eff = s["efficiency"]
        lines.append(
            f"{s['kind']:7} {s['channels']:>3} {_size(s['packet_size']):>6} {s['devices']:>3}"
            f" {_size(s['size']):>6} {s['order']:10} {s['transport']:4} {s['sink']:13}"
            f" {_fmt(s['downtime']['median'], digits=3):>10}"
            f" {_fmt(s['throughput']['median'], 1e-6, 0):>7}"
            f" {_fmt(s['bound']['median'], digits=3):>8}"
            f" {_fmt(eff['median'], digits=3):>5}"
            f" {_fmt(eff['min']) + '-' + _fmt(eff['max']):>11}"
            f" {_fmt(s['peak_queued_bytes']['median'], 2**-20, 1):>9}"
            f" {_fmt(s['starved_seconds']['median'], digits=3):>7}"
            f" {_fmt(s['cpu_seconds']['median'], digits=2):>6}"
            f" {_fmt(s['harness_fraction']['max'], 100, 3):>6}"
            f" {_fmt(s.get('speedup_vs_seq', math.nan)):>5}"
            f" {_fmt(s.get('throughput_vs_cref', math.nan)):>5}"
            + (f"  FAILED {s['runs'] - s['ok']}/{s['runs']}" if s["ok"] < s["runs"] else "")
        )
    return "\n".join(lines)


def write_csv(path: Path, runs: list[Run]) -> None:
    rows = [r.row() for r in runs]
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _clean(obj: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, meta: dict[str, Any], runs: list[Run], summaries: list[Any]) -> None:
    doc = {"meta": meta, "summary": summaries, "runs": [r.row() for r in runs]}
    path.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")


class Progress:
    """A one-line progress bar on stderr (a line per run when stderr is not a terminal)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.label = ""
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def start(self, label: str) -> None:
        self.label = label
        self.tick(0, 1)

    def tick(self, landed: int, total: int) -> None:
        if not self.tty:
            return
        frac = (self.done + (landed / total if total else 0.0)) / max(self.total, 1)
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = f"\r[{bar}] {frac * 100:5.1f}% run {self.done + 1}/{self.total}: {self.label}"
        self.stream.write(line[:120].ljust(120))
        self.stream.flush()

    def finish_run(self, run: Run) -> None:
        """Off a terminal, one log line per run (event ``bench_run``, shown without ``-v``)."""
        self.done += 1
        if not self.tty:
            what = (
                f"{run.downtime:.3f} s, eff {run.efficiency:.3f}"
                if run.ok
                else f"FAILED: {run.error}"
            )
            fields: dict[str, Any] = {
                "run": self.done,
                "of": self.total,
                "case": self.label,
                "ok": run.ok,
            }
            if run.ok:
                fields |= {"downtime": run.downtime, "efficiency": run.efficiency}
            else:
                fields["error"] = run.error
            log.log(
                logging.WARNING if not run.ok else logging.INFO,
                "run %d/%d %s: %s",
                self.done,
                self.total,
                self.label,
                what,
                extra=event("bench_run", **fields),
            )

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()


__all__ = ["Progress", "summarise", "table", "write_csv", "write_json"]
