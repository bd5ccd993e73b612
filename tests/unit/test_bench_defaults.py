"""The bench's defaults answer "how many channels": the default matrix, the advice lines,
the QEMU table and the plots (axes from zero, one panel per sink and device count)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from vfiomig.bench import QEMU_DEVICE_BW, QEMU_TIME_SCALE, _plan
from vfiomig.bench._plots import make_plots
from vfiomig.bench._verdict import channel_advice, qemu_table
from vfiomig.cli._main import build_parser


def _args(*extra: str) -> Any:
    return build_parser().parse_args(["bench", *extra])


def test_default_matrix_is_where_channels_matter() -> None:
    cases, skipped, models, scale = _plan(_args())
    assert not skipped and scale == 1.0
    assert {c.channels for c in cases} == {1, 2, 4, 8}
    assert {c.sink for c in cases} == {"null", "device"}
    assert {c.devices for c in cases} == {1, 2}
    assert len(cases) == 16
    # The device model runs at the qemu scenario's per-device bandwidth, and one channel
    # (the link model) carries less than one device takes: channel count matters.
    assert models.device_bandwidth == pytest.approx(QEMU_DEVICE_BW / QEMU_TIME_SCALE)
    assert models.channel_rate is not None and models.channel_rate < models.device_bandwidth
    assert _args().repeats == 2


def test_channel_rate_zero_means_unpaced_and_qemu_is_unpaced() -> None:
    assert _plan(_args("--channel-rate", "0"))[2].channel_rate is None
    cases, _, models, scale = _plan(_args("--scenario", "qemu"))
    assert models.channel_rate is None and scale == QEMU_TIME_SCALE
    assert {c.channels for c in cases} == {1, 6, 8, 15} and {c.devices for c in cases} == {4}


def _summary(kind: str, channels: int, downtime: float, **kw: Any) -> dict[str, Any]:
    def stat(v: float) -> dict[str, float]:
        return {"min": v, "median": v, "max": v}

    base = {"sink": "device", "devices": 2, "packet_size": 2**20, "order": "roundrobin"}
    base |= {"transport": "tcp", "size": 16 * 2**20} | kw
    bound = kw.pop("bound", downtime * 0.8)
    return {
        "kind": kind,
        "channels": channels,
        "ok": 2,
        **base,
        "downtime": stat(downtime),
        "bound": stat(bound),
        "throughput": stat(base["size"] * base["devices"] / downtime),
        "efficiency": stat(bound / downtime),
    }


def test_channel_advice_picks_the_fewest_channels_near_the_best() -> None:
    rows = [_summary("vfiomig", c, d) for c, d in ((1, 1.0), (2, 0.52), (4, 0.30), (8, 0.29))]
    models = {"channel_rate": 32 * 2**20, "device_bandwidth": 84.5 * 2**20}
    (head, line) = channel_advice(rows, models)
    assert head.startswith("How many channels")
    assert ": 4 channels (300 ms; 1 ch 1000 ms)" in line
    assert line.endswith("the models saturate the devices from 6 channels")


def test_qemu_table_beside_qemus_published_downtimes() -> None:
    rows = [_summary("seq", 1, 4.0)]
    rows += [_summary("vfiomig", c, d) for c, d in ((1, 4.0), (6, 2.0), (8, 2.1), (15, 2.2))]
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


def test_plots_have_a_panel_per_sink_and_device_count_from_zero(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")  # the plot extra, in [dev]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        _summary("vfiomig", c, 1.0 / c + 0.05 * devices, sink=sink, devices=devices)
        for sink in ("null", "device")
        for devices in (1, 2)
        for c in (1, 2, 4, 8)
    ]
    saved: list[Any] = []
    real_close = plt.close
    plt.close = lambda fig: saved.append(fig)  # keep the figures to look at them
    try:
        paths = make_plots(rows, tmp_path)
    finally:
        plt.close = real_close
    assert isinstance(paths, list)
    assert [p.name for p in paths] == ["throughput.png", "downtime.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    for fig in saved:
        axes = fig.get_axes()
        titles = sorted(ax.get_title() for ax in axes)
        assert titles == [
            "device sink, 1 device",
            "device sink, 2 devices",
            "null sink, 1 device",
            "null sink, 2 devices",
        ]
        for ax in axes:
            assert ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0
        labels = {ax.get_ylabel() for ax in axes} - {""}
        assert labels <= {"state throughput (MB/s, median)", "downtime (ms, median)"}
        assert all(not math.isnan(line.get_ydata()[0]) for ax in axes for line in ax.lines)
        real_close(fig)
