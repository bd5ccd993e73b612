"""PNG plots (matplotlib, an optional extra: ``pip install 'vfiomig[plot]'``).

- ``throughput.png``: state MB/s against channel count, one panel per sink and device
  count, one line per packet size, with the models' bound (state bytes over the bound's
  time) dashed: where the line meets it, more channels cannot help.
- ``downtime.png``: the same panels for downtime in ms, bound dashed.

Both axes start at zero, so that a flat line looks flat; only vfiomig rows are plotted,
for the first value of the order, transport and size axes.
"""

from __future__ import annotations

import importlib
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

Panel = tuple[str, int]  # (sink, devices)
Line = dict[int, list[tuple[int, float, float]]]  # packet size -> [(channels, value, bound)]


def _panels(rows: list[dict[str, Any]], measure: str) -> dict[Panel, Line]:
    panels: dict[Panel, Line] = defaultdict(lambda: defaultdict(list))
    for s in rows:
        value, bound = s[measure]["median"], s["bound"]["median"]
        if measure == "throughput":
            value /= 1e6
            state = s["size"] * s["devices"]
            bound = state / bound / 1e6 if bound > 0 else math.nan
        else:
            value, bound = value * 1000, bound * 1000
        if not math.isnan(value):
            panels[s["sink"], s["devices"]][s["packet_size"]].append((s["channels"], value, bound))
    return panels


def _figure(plt: Any, panels: dict[Panel, Line], ylabel: str, title: str) -> Any:
    sinks = sorted({p[0] for p in panels})
    devices = sorted({p[1] for p in panels})
    fig, axes = plt.subplots(
        len(sinks),
        len(devices),
        figsize=(4.2 * len(devices), 3.2 * len(sinks)),
        squeeze=False,
        sharex=True,
    )
    for i, sink in enumerate(sinks):
        for j, ndev in enumerate(devices):
            ax = axes[i][j]
            lines = panels.get((sink, ndev), {})
            top = 0.0
            for packet, pts in sorted(lines.items()):
                pts.sort()
                xs = [p[0] for p in pts]
                (line,) = ax.plot(xs, [p[1] for p in pts], marker="o", label=f"{packet >> 10} KiB")
                bounds = [p[2] for p in pts]
                if not all(math.isnan(b) for b in bounds):
                    ax.plot(xs, bounds, linestyle="--", color=line.get_color(), alpha=0.6)
                top = max([top, *(p[1] for p in pts), *(b for b in bounds if not math.isnan(b))])
            ax.set_xlim(
                left=0, right=max((p[0] for ln in lines.values() for p in ln), default=1) + 1
            )
            ax.set_ylim(bottom=0, top=top * 1.1 if top > 0 else 1)
            ax.set_title(f"{sink} sink, {ndev} device{'s' if ndev > 1 else ''}", fontsize=10)
            ax.grid(True, alpha=0.3)
            if i == len(sinks) - 1:
                ax.set_xlabel("channels")
            if j == 0:
                ax.set_ylabel(ylabel)
            if lines:
                ax.legend(title="packet (dashed: bound)", fontsize=8, title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def make_plots(summaries: list[dict[str, Any]], out: Path) -> list[Path] | str:
    """Write the plots; return their paths, or why they were skipped."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'vfiomig[plot]')"
    rows = [s for s in summaries if s["kind"] == "vfiomig" and s["ok"]]
    if not rows:
        return "plots skipped: no successful vfiomig run"
    first = rows[0]
    fixed = ("size", "order", "transport")
    rows = [s for s in rows if all(s[k] == first[k] for k in fixed)]
    what = f"{first['size'] >> 20} MiB per device, {first['order']}, {first['transport']}"
    paths: list[Path] = []
    for measure, ylabel, name in (
        ("throughput", "state throughput (MB/s, median)", "throughput.png"),
        ("downtime", "downtime (ms, median)", "downtime.png"),
    ):
        fig = _figure(plt, _panels(rows, measure), ylabel, f"vfiomig {measure}: {what}")
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


__all__ = ["make_plots"]
