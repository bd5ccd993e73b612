"""PNG plots (matplotlib, an optional extra: ``pip install vfiomig[plot]``).

- ``throughput.png``, ``efficiency.png``: against channel count, one line per packet size;
- ``downtime.png``: against the number of devices, one line per channel count.

Only vfiomig rows are plotted, for the first value of every other matrix axis, so that
each line varies one thing.
"""

from __future__ import annotations

import importlib
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


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
    fixed = ("size", "order", "transport", "sink")
    rows = [s for s in rows if all(s[k] == first[k] for k in fixed)]
    paths: list[Path] = []
    title = f"{first['sink']} sink, {first['order']}, {first['transport']}"
    for measure, ylabel, name in (
        ("throughput", "throughput (MB/s, median)", "throughput.png"),
        ("efficiency", "efficiency = bound / downtime (median)", "efficiency.png"),
    ):
        lines: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for s in rows:
            if s["devices"] == first["devices"]:
                v = s[measure]["median"]
                v = v / 1e6 if measure == "throughput" else v
                if not math.isnan(v):
                    lines[s["packet_size"]].append((s["channels"], v))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for packet, pts in sorted(lines.items()):
            pts.sort()
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{packet >> 10} KiB"
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("channels")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {first['devices']} device(s)")
        ax.legend(title="packet size")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    by_channels: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for s in rows:
        if s["packet_size"] == first["packet_size"]:
            by_channels[s["channels"]].append((s["devices"], s["downtime"]["median"]))
    if any(len(v) > 1 for v in by_channels.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for ch, pts in sorted(by_channels.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{ch} ch")
        ax.set_xlabel("devices")
        ax.set_ylabel("downtime (s, median)")
        ax.set_title(title)
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "downtime.png", dpi=100)
        plt.close(fig)
        paths.append(out / "downtime.png")
    return paths


__all__ = ["make_plots"]
