"""The plots show what the table says: every point, min-max bar, bound and marked answer
of ``downtime.png`` is read back from the figure and compared with the printed table;
``qemu.png`` carries QEMU's published downtimes and the single-stream line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.bench_summaries import summary
from vfiomig.bench._advice import advise
from vfiomig.bench._plots import make_plots
from vfiomig.bench._report import table
from vfiomig.bench._verdict import qemu_table

MODELS = ["link: 32 MiB/s per channel, no total limit", "device: 84.5 MiB/s, 20 us per write"]


def _figures(monkeypatch: pytest.MonkeyPatch, *args: Any) -> tuple[list[Path], list[Any]]:
    matplotlib = pytest.importorskip("matplotlib")  # the plot extra, in [dev]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved: list[Any] = []
    monkeypatch.setattr(plt, "close", saved.append)  # keep the figures to read them
    paths = make_plots(*args)
    assert isinstance(paths, list), paths
    return paths, saved


def _table_cells(text: str) -> dict[tuple[str, str, int], tuple[int, int, int, str]]:
    """(section, kind, channels) -> (median, min, max, bound) as the table prints them."""
    out: dict[tuple[str, str, int], tuple[int, int, int, str]] = {}
    section = ""
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line
        m = re.match(r"\s+(vfiomig|seq)\s+(\d+)\s+(\d+) \((\d+)-(\d+)\)\s+\S+\s+(\S+)", line)
        if m:
            kind, ch, med, lo, hi, bound = m.groups()
            out[section, kind, int(ch)] = (int(med), int(lo), int(hi), bound)
    return out


def test_the_downtime_plot_shows_the_tables_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = []
    for sink, limit in (("null", "config"), ("device", "device")):
        for devices in (1, 2):
            for packet in (256 << 10, 1 << 20):
                for c, d in ((1, 0.9), (2, 0.48), (4, 0.3), (8, 0.29)):
                    rows.append(summary(
                        "vfiomig", c, d * devices * (1.1 if packet < 2**20 else 1),
                        spread=0.06 + 0.01 * c, sink=sink, devices=devices,
                        packet_size=packet, bound_limit=limit, bound=0.25 * devices,
                    ))  # fmt: skip
    advice = advise(rows, cpus=2)
    cells = _table_cells(table(rows, MODELS))
    assert len(cells) == len(rows)
    paths, figs = _figures(monkeypatch, rows, tmp_path, MODELS, advice)
    assert [p.name for p in paths] == ["downtime.png"]
    assert 5_000 < paths[0].stat().st_size < 150_000
    (fig,) = figs
    assert "link: 32 MiB/s per channel" in fig._suptitle.get_text()
    axes = fig.get_axes()
    assert len(axes) == 4
    compared = 0
    for ax in axes:
        title = ax.get_title()
        m = re.match(r"(\w+) sink, (\d+) devices?[:\n]", title)
        assert m, title
        sink, devices = m.group(1), int(m.group(2))
        assert sorted(ax.get_xticks()) == [1, 2, 4, 8]  # the counts measured, no others
        assert ax.get_ylim()[0] == 0
        answers = {
            (a.packet_size, a.channels) for a in advice if (a.sink, a.devices) == (sink, devices)
        }
        # The answer for each line is named in the title and starred at its median.
        stars = [tuple(o) for coll in ax.collections if coll.get_label() != "_nolegend_"
                 for o in coll.get_offsets()]  # fmt: skip
        bounds = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(bounds) == (2 if sink == "device" else 0)  # config-only: not drawn
        for container in ax.containers:
            packet = container.get_label().split()[0]
            section = (f"{sink} sink, {devices} device{'s' if devices > 1 else ''} x 16M,"
                       f" {packet} packets, roundrobin, tcp")  # fmt: skip
            line = container.lines[0]
            segments = container.lines[2][0].get_segments()
            for x, y, seg in zip(line.get_xdata(), line.get_ydata(), segments, strict=True):
                med, lo, hi, _ = cells[section, "vfiomig", int(x)]
                assert (round(y), round(seg[0][1]), round(seg[1][1])) == (med, lo, hi)
                compared += 1
            for b in bounds:
                for x, y in zip(b.get_xdata(), b.get_ydata(), strict=True):
                    assert f"{y:.0f}" == cells[section, "vfiomig", int(x)][3]
            size = 256 << 10 if packet == "256K" else 1 << 20
            pick = next(c for p, c in answers if p == size)
            assert f"{pick} channel" in title
            assert any(x == pick and round(y) == cells[section, "vfiomig", pick][0]
                       for x, y in stars)  # fmt: skip
    assert compared == len(rows)


def test_the_qemu_plot_is_beside_qemus_published_downtimes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [summary("seq", 1, 4.0, devices=4, size=100 << 20)]
    rows += [summary("vfiomig", c, d, devices=4, size=100 << 20, spread=0.05)
             for c, d in ((1, 4.0), (6, 2.0), (8, 2.1), (15, 2.2))]  # fmt: skip
    _, meta = qemu_table(rows, 4.0)
    paths, figs = _figures(monkeypatch, rows, tmp_path, MODELS, advise(rows, cpus=2), meta)
    assert [p.name for p in paths] == ["downtime.png", "qemu.png"]
    ax = figs[1].get_axes()[0]
    qemu = next(ln for ln in ax.get_lines() if ln.get_label().startswith("QEMU"))
    assert list(qemu.get_xdata()) == [6, 8, 15]
    assert list(qemu.get_ydata()) == pytest.approx([1095 / 1900, 1104 / 1900, 1125 / 1900])
    single = next(ln for ln in ax.get_lines() if ln.get_label().startswith("single stream"))
    assert list(single.get_ydata()) == [1.0, 1.0]
    assert single.get_label() == "single stream (QEMU 1900 ms, vfiomig 4000 ms)"
    ours = ax.containers[0].lines[0]
    assert list(ours.get_ydata()) == pytest.approx([1.0, 0.5, 0.525, 0.55])
    assert sorted(ax.get_xticks()) == [1, 6, 8, 15]


def test_qemu_table_beside_qemus_published_downtimes() -> None:
    rows = [summary("seq", 1, 4.0)]
    rows += [summary("vfiomig", c, d) for c, d in ((1, 4.0), (6, 2.0), (8, 2.1), (15, 2.2))]
    lines, meta = qemu_table(rows, 4.0)
    text = "\n".join(lines)
    assert "QEMU ms" in lines[1]
    single = next(ln for ln in lines if ln.strip().startswith("single"))
    assert single.split() == ["single", "4000", "1000", "1.00", "|", "1900", "1.00"]
    six = next(ln for ln in lines if ln.split()[0] == "6")
    assert six.split() == ["6", "2000", "500", "0.50", "|", "1095", "0.58"]
    assert "1104" in text and "1125" in text
    assert meta["qemu_downtime_ms"] == {6: 1095, 8: 1104, 15: 1125}
    assert meta["qemu_main_channel_ms"] == 1900
