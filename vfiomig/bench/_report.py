"""Statistics over repeats (numpy), the terminal table, the progress bar, CSV and JSON.

A summary row is one (kind, case): min / median / max of each measure over its repeats,
the downtimes themselves (for `_advice`), and each process's share of CPU (`_cpu`).
Ratios against the baselines pair runs of the same repeat index from the same bench
invocation, then take the median of those ratios.

The table has one section per group of cells that differ only in their channel count
(the groups `_advice` answers for), under the models it ran with, and fits 100 columns.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import textwrap
from collections import defaultdict
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vfiomig._logs import event

from ._runner import Case, Run, _size

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


#: The table's width limit (a terminal or a commit message).
WIDTH = 100


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _shares(run: Run) -> dict[str, float]:
    """Receiver (rx) and sender (tx) CPU as fractions: ``busy`` ran, ``wanted`` ran or
    waited for a CPU; ``tx_span`` the sender's sending time over the downtime;
    ``starved_share`` the time the receiver's loaders waited for data over the downtime."""
    send = run.sender_send_seconds
    return {
        "rx_busy": _div(run.cpu_seconds, run.downtime),
        "rx_wanted": _div(run.cpu_seconds + run.cpu_wait_seconds, run.downtime),
        "tx_busy": _div(run.sender_cpu_seconds, send),
        "tx_wanted": _div(run.sender_cpu_seconds + run.sender_wait_seconds, send),
        "tx_span": _div(send, run.downtime),
        "starved_share": _div(run.starved_seconds, run.downtime),
    }


SHARES = ("rx_busy", "rx_wanted", "tx_busy", "tx_wanted", "tx_span", "starved_share")


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
        shares = [_shares(r) for r in ok]
        for m in SHARES:
            summary[m] = _stats([sh[m] for sh in shares])
        summary["downtimes"] = sorted(r.downtime for r in ok)
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


def _downtime(d: dict[str, float], unit: str) -> str:
    """``221 (210-240)``: the median downtime with its min-max, in ms or (``s``) seconds
    with one decimal."""
    if math.isnan(d["median"]):
        return "-"
    v = [d[k] for k in ("median", "min", "max")]
    t = [f"{x:.1f}" for x in v] if unit == "s" else [str(round(x * 1000)) for x in v]
    return f"{t[0]} ({t[1]}-{t[2]})"


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{v * 100:.0f}"


#: (heading, width) of the table's columns; `row_cells` gives a summary's cells.
COLUMNS = (
    ("kind", 7),
    ("ch", 3),
    ("downtime ms", 19),
    ("MB/s", 6),
    ("bound ms", 8),
    ("eff", 5),
    ("peakQ", 6),
    ("rx%", 4),
    ("tx%", 4),
    ("limit", 12),
    ("xSeq", 5),
    ("/C", 4),
    ("n", 2),
)


def _case(s: dict[str, Any]) -> Case:
    return Case(*(s[f.name] for f in fields(Case)))


def section_title(s: dict[str, Any]) -> str:
    """A group's heading: everything its rows share."""
    dev = "device" if s["devices"] == 1 else "devices"
    return (
        f"{s['sink']} sink, {s['devices']} {dev} x {_size(s['size'])}, {_size(s['packet_size'])}"
        f" packets, {s['order']}, {s['transport']}"
    )


def row_cells(s: dict[str, Any], limit: str = "", unit: str = "ms") -> list[str]:
    """A summary's cells, in `COLUMNS` order; the downtime in ``unit`` (ms or s)."""
    return [
        s["kind"],
        str(s["channels"]),
        _downtime(s["downtime"], unit),
        _fmt(s["throughput"]["median"], 1e-6, 0),
        _fmt(s["bound"]["median"], 1000, 0),
        _fmt(s["efficiency"]["median"]),
        _fmt(s["peak_queued_bytes"]["median"], 2**-20, 1),
        _pct(s["rx_busy"]["median"]),
        _pct(s["tx_busy"]["median"]),
        limit or "-",
        _fmt(s.get("speedup_vs_seq", math.nan)),
        _fmt(s.get("throughput_vs_cref", math.nan)),
        str(s["ok"]),
    ]


def table(summaries: list[dict[str, Any]], header: list[str]) -> str:
    """The terminal table: ``header`` (the models) first, then a section per group with
    the sequential baseline, the vfiomig cells by channel count and the C reference, and
    what limited each (a summary's ``limit``, `_advice.limit`)."""
    # Milliseconds unless a run took 10 s or more: then seconds, for the column to fit.
    slowest = max((s["downtime"]["max"] for s in summaries), default=0.0)
    unit = "s" if slowest >= 10 else "ms"
    columns = [(f"downtime {unit}", w) if i == 2 else (n, w) for i, (n, w) in enumerate(COLUMNS)]
    head = " ".join(f"{name:>{w}}" if i else f"{name:{w}}" for i, (name, w) in
                    enumerate(columns))  # fmt: skip
    lines = [*header, ""]
    sections: dict[str, list[dict[str, Any]]] = defaultdict(list)
    order = {"seq": 0, "vfiomig": 1, "cref": 2}
    for s in summaries:
        if s["kind"] != "seq":
            sections[section_title(s)].append(s)
    for s in summaries:  # the sequential baseline heads each section it is the baseline of
        if s["kind"] == "seq":
            mine = [
                t for t, rows in sections.items() if seq_key(_case(rows[0])) == seq_key(_case(s))
            ]
            for title in mine or [section_title(s)]:
                sections[title].append(s)
    for title, rows in sections.items():
        lines += [title, "  " + head]
        rows.sort(key=lambda s: (order.get(s["kind"], 3), s["channels"]))
        for s in rows:
            failed = f"FAILED {s['runs'] - s['ok']}/{s['runs']}" if s["ok"] < s["runs"] else ""
            cells = row_cells(s, failed or s.get("limit", ""), unit)
            line = " ".join(
                f"{c:>{w}}" if i else f"{c:{w}}"
                for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))
            )
            lines.append("  " + line)
        lines.append("")
    lines.append(
        "downtime: median (fastest-slowest repeat); eff: bound / downtime; peakQ: MiB queued"
        " at most; rx% / tx%: the receiver's CPU over the downtime, the sender's over its"
        " sending (100 = one CPU); xSeq: the sequential baseline's downtime over this; /C:"
        " throughput over the C reference's; n: repeats"
    )
    return "\n".join(_wrap(ln) for ln in lines)


def _wrap(line: str) -> str:
    """A line longer than `WIDTH` broken at spaces (only the notes are that long)."""
    return "\n".join(textwrap.wrap(line, WIDTH)) if len(line) > WIDTH else line


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


__all__ = [
    "COLUMNS",
    "WIDTH",
    "Progress",
    "row_cells",
    "section_title",
    "summarise",
    "table",
    "write_csv",
    "write_json",
]
