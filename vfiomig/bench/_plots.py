"""PNG plots (matplotlib, an optional extra: ``pip install 'vfiomig[plot]'``).

- ``downtime.png``: one panel per sink and device count, one message each: the downtime
  (median, with the fastest and slowest repeat as a bar) against the channel counts
  measured (the ticks), the answer `_advice` gives marked with a star and named in the
  panel's title with what limits it, and the models' bound as a grey dashed line where it
  is informative (the device or link model sets it; a config-only bound says nothing).
- ``qemu.png`` (``--scenario qemu``): vfiomig's downtimes and QEMU's published ones, each
  over its own single-stream downtime (vfiomig's sequential baseline, QEMU's main
  channel), with that single stream as the line at 1.

Every point comes from the summaries the table prints (a test compares them); the
models are in the figure's title. Only vfiomig rows are plotted, for the first value of
the order, transport and size axes.
"""

from __future__ import annotations

import importlib
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from ._advice import Advice, group_key
from ._plan import plural
from ._runner import _size

DPI = 80
PANEL_W, PANEL_H = 4.6, 3.4
BOUND_STYLE = {"color": "black", "linestyle": (0, (3, 3)), "linewidth": 1.2, "zorder": 4}
PICK_STYLE = {"marker": "*", "s": 220, "color": "crimson", "zorder": 5, "edgecolor": "black"}


def _title(fig: Any, title: str, models: list[str], width_in: float) -> None:
    """A title that fits the figure: wrapped to its width (about 5.5 pt per character)."""
    chars = max(40, int(width_in * 72 / 5.5))
    lines = textwrap.wrap(title, chars) + [w for m in models for w in textwrap.wrap(m, chars)]
    fig.suptitle("\n".join(lines), fontsize=9)


def _downtime(plt: Any, rows: list[dict[str, Any]], advice: list[Advice],
              models: list[str], what: str) -> Any:  # fmt: skip
    answers = {(a.sink, a.devices, a.size, a.packet_size, a.order, a.transport): a for a in advice}
    panels: dict[tuple[str, int], dict[int, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for s in rows:
        panels[s["sink"], s["devices"]][s["packet_size"]].append(s)
    sinks = sorted({p[0] for p in panels})
    devices = sorted({p[1] for p in panels})
    width = max(6.0, PANEL_W * len(devices))
    # Milliseconds unless a run took 10 s or more, as in the table.
    unit = 1.0 if max(s["downtime"]["max"] for s in rows) >= 10 else 1000.0
    uname = "s" if unit == 1.0 else "ms"
    fig, axes = plt.subplots(
        len(sinks), len(devices), figsize=(width, PANEL_H * len(sinks) + 0.8),
        squeeze=False, layout="constrained",
    )  # fmt: skip
    for i, sink in enumerate(sinks):
        for j, ndev in enumerate(devices):
            ax = axes[i][j]
            lines = panels.get((sink, ndev), {})
            counts: set[int] = set()
            told: dict[str, str] = {}  # packet size -> the answer in words
            bound_drawn = False
            for packet, cells in sorted(lines.items()):
                cells.sort(key=lambda s: s["channels"])
                xs = [s["channels"] for s in cells]
                counts.update(xs)
                med = [s["downtime"]["median"] * unit for s in cells]
                lo = [m - s["downtime"]["min"] * unit for m, s in zip(med, cells, strict=True)]
                hi = [s["downtime"]["max"] * unit - m for m, s in zip(med, cells, strict=True)]
                ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=4, zorder=3, linewidth=2.5,
                            alpha=0.8, label=f"{_size(packet)} packets")  # fmt: skip
                if all(s["bound_limit"] in ("device", "link") for s in cells):
                    limits = list(dict.fromkeys(s["bound_limit"] for s in cells))
                    label = f"bound ({', then '.join(limits)} model)"
                    ax.plot(xs, [s["bound"]["median"] * unit for s in cells], **BOUND_STYLE,
                            label=None if bound_drawn else label)  # fmt: skip
                    bound_drawn = True
                a = answers.get(group_key(cells[0]))
                if a is not None:
                    pick = next(s for s in cells if s["channels"] == a.channels)
                    ax.scatter([a.channels], [pick["downtime"]["median"] * unit], **PICK_STYLE,
                               label="the answer" if not told else None)  # fmt: skip
                    more = ", try more" if a.try_more else ""
                    told[_size(packet)] = f"{plural(a.channels, 'channel')} ({a.limit}{more})"
            ax.set_xticks(sorted(counts))
            ax.set_xlim(0, max(counts, default=1) * 1.08 + 0.5)
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)
            head = f"{sink} sink, {plural(ndev, 'device')}"
            if len(set(told.values())) == 1:
                head += ": " + next(iter(told.values()))
            elif told:  # one answer per packet size, on a line of its own
                head += "\n" + "; ".join(f"{k}: {v}" for k, v in told.items())
            ax.set_title(head, fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("channels")
            ax.set_ylabel(f"downtime {uname} (median, min-max)")
            if lines:
                ax.legend(fontsize=7, loc="upper right")
    _title(fig, f"vfiomig downtime ({what}); the answer: the fewest channels not slower"
           " than the best beyond the spread", models, width)  # fmt: skip
    return fig


def _qemu(plt: Any, rows: list[dict[str, Any]], seq: dict[str, Any] | None,
          qemu: dict[str, Any], advice: list[Advice], models: list[str]) -> Any:  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.4, 5.0), layout="constrained")
    rows = sorted(rows, key=lambda s: s["channels"])
    counts = {s["channels"] for s in rows} | {int(c) for c in qemu["qemu_downtime_ms"]}
    if seq is not None:
        base = seq["downtime"]["median"]
        xs = [s["channels"] for s in rows]
        med = [s["downtime"]["median"] / base for s in rows]
        lo = [m - s["downtime"]["min"] / base for m, s in zip(med, rows, strict=True)]
        hi = [s["downtime"]["max"] / base - m for m, s in zip(med, rows, strict=True)]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=4, zorder=3,
                    label="vfiomig / sequential baseline")  # fmt: skip
        for a in advice:
            pick = next((s for s in rows if s["channels"] == a.channels), None)
            if pick is not None:
                ax.scatter([a.channels], [pick["downtime"]["median"] / base], **PICK_STYLE,
                           label=f"answer: {plural(a.channels, 'channel')}")  # fmt: skip
    qx = sorted(int(c) for c in qemu["qemu_downtime_ms"])
    qy = [qemu["qemu_downtime_ms"][c] / qemu["qemu_main_channel_ms"] for c in qx]
    ax.plot(qx, qy, marker="s", linestyle="--", color="tab:orange", zorder=3,
            label="QEMU v3 published / main channel")  # fmt: skip
    single = f"QEMU {qemu['qemu_main_channel_ms']} ms"
    if seq is not None:
        single += f", vfiomig {seq['downtime']['median'] * 1000:.0f} ms"
    ax.axhline(1.0, color="0.35", linestyle=":", linewidth=1.4,
               label=f"single stream ({single})")  # fmt: skip
    ax.set_xticks(sorted(counts))
    ax.set_xlim(0, max(counts) + 1)
    ax.set_ylim(0, max(1.15, ax.get_ylim()[1]))
    ax.set_xlabel("channels")
    ax.set_ylabel("downtime / single-stream downtime")
    ax.grid(True, alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center", ncol=2)
    ax.set_title("below 1: faster than one stream", fontsize=9)
    _title(fig, "QEMU scenario (4 devices x 100 MiB) beside QEMU's published downtimes",
           models, 6.4)  # fmt: skip
    return fig


def make_plots(
    summaries: list[dict[str, Any]],
    out: Path,
    models: list[str],
    advice: list[Advice],
    qemu: dict[str, Any] | None = None,
) -> list[Path] | str:
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
    what = f"{_size(first['size'])} per device, {first['order']}, {first['transport']}"
    figures = [("downtime.png", _downtime(plt, rows, advice, models, what))]
    if qemu is not None:
        seq = next((s for s in summaries if s["kind"] == "seq" and s["ok"]), None)
        figures.append(("qemu.png", _qemu(plt, rows, seq, qemu, advice, models)))
    paths: list[Path] = []
    for name, fig in figures:
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
        paths.append(out / name)
    return paths


__all__ = ["make_plots"]
