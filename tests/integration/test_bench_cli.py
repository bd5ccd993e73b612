"""A small matrix through the real command line: ``python -m vfiomig bench``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "runs.csv").open() as f:
        return list(csv.DictReader(f))


def _bench(
    tmp_path: Path, *args: str, plots: bool = False, repeats: str = "1"
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "vfiomig", "bench", "--repeats", repeats, "--no-cref"]
    argv += [*([] if plots else ["--no-plots"]), "--out", str(out), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc, out


def test_small_matrix_writes_csv_and_json(tmp_path: Path) -> None:
    proc, out = _bench(
        tmp_path,
        *("--channels", "1,2", "--size", "2M", "--packet-sizes", "256K", "--devices", "1"),
        *("--sinks", "device,pipe", "--device-bw", "16M", "--config-time", "0.005"),
    )
    rows = _rows(out)
    kinds = sorted((r["kind"], r["sink"], r["channels"]) for r in rows)
    assert kinds == [
        ("seq", "device", "1"),
        ("seq", "pipe", "1"),
        ("vfiomig", "device", "1"),
        ("vfiomig", "device", "2"),
        ("vfiomig", "pipe", "1"),
        ("vfiomig", "pipe", "2"),
    ]
    assert all(r["ok"] == "True" for r in rows)
    assert all(int(r["bytes"]) == 2 * 2**20 for r in rows)
    device = [r for r in rows if r["sink"] == "device"]
    for r in device:
        # Never faster than the bound: 2 MiB at 16 MiB/s plus 5 ms of config.
        assert float(r["bound"]) == 0.125 + 0.005
        assert 0 < float(r["efficiency"]) <= 1.0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["plots"] == "plots skipped: --no-plots"
    assert {s["kind"] for s in doc["summary"]} == {"vfiomig", "seq"}
    summary = next(s for s in doc["summary"] if s["kind"] == "vfiomig" and s["sink"] == "device")
    assert summary["speedup_vs_seq"] is not None
    assert "harness overhead" in proc.stdout
    # The table names its models, as bench.json does, and fits 100 columns.
    lines = proc.stdout.splitlines()
    assert lines[0] == "models: " + doc["meta"]["models_text"][0]
    assert lines[0] == "models: link: 32 MiB/s per channel, no total limit"  # the default
    assert doc["meta"]["models"]["channel_rate"] == 32 * 2**20
    assert lines[1].strip() == doc["meta"]["models_text"][1]
    assert lines[1].strip().startswith("device: 16 MiB/s, 20 us per write; config load 5 ms")
    text = [ln for ln in lines if not ln.startswith("wrote ")]  # paths are as long as they are
    assert max(len(ln) for ln in text) <= 100, max(text, key=len)
    assert "device sink, 1 device x 2M, 256K packets, roundrobin, tcp" in lines
    assert "1 channels" not in proc.stdout and "1 devices" not in proc.stdout
    # CPU per process: the receiver's and the sender's, for every run.
    for r in doc["runs"]:
        assert r["cpu_seconds"] >= 0 and r["sender_cpu_seconds"] >= 0, r
        assert 0 < r["sender_send_seconds"] <= r["sender_seconds"]
    assert all(s["limit"] for s in doc["summary"] if s["kind"] == "vfiomig")
    assert {a["sink"] for a in doc["meta"]["advice"]} == {"device", "pipe"}


def test_slow_channel_unix_tmpfs(tmp_path: Path) -> None:
    _, out = _bench(
        tmp_path,
        *("--channels", "2", "--size", "1M", "--packet-sizes", "128K", "--no-seq"),
        *("--orders", "slow,idx0-last", "--transports", "unix", "--sinks", "tmpfs"),
        *("--slow-rate", "8M", "--config-time", "0"),
    )
    rows = {r["order"]: r for r in _rows(out)}
    assert set(rows) == {"slow", "idx0-last"}
    slow = rows["slow"]
    # Channel 0 carries half the state at 8 MiB/s: the link bounds the run.
    assert slow["bound_limit"] == "link"
    assert float(slow["bound"]) >= 0.0625
    assert float(slow["downtime"]) >= float(slow["bound"])


def test_precopy_scenario_downtime_next_to_stop_copy(tmp_path: Path) -> None:
    # 12 MiB of initial state at 32 MiB/s: without precopy 13 MiB are read after the stop
    # (bound ~416 ms); with it 1.5 MiB (the 512 KiB dirty under the 1 MiB threshold and
    # the 1 MiB stop-copy part) after two rounds (12 MiB initial, 2 MiB dirty).
    proc, out = _bench(
        tmp_path,
        *("--scenario", "precopy", "--size", "12M", "--device-bw", "32M", "--repeats", "1"),
    )
    doc = json.loads((out / "precopy.json").read_text())
    runs = {r["mode"]: r for r in doc["runs"]}
    assert set(runs) == {"precopy", "stop-copy"} and all(r["ok"] for r in runs.values())
    pre, stop = runs["precopy"], runs["stop-copy"]
    assert stop["bytes_after_stop"] == 12 * 2**20 + 2**20 and stop["precopy_bytes"] == 0
    assert pre["precopy_rounds"] == 2
    assert pre["precopy_bytes"] == 14 * 2**20
    assert pre["bytes_after_stop"] == 2**20 + 2**19
    for r in runs.values():  # never faster than the bound
        assert r["bound"] == r["bytes_after_stop"] / (32 * 2**20) + 0.01
        assert 0 < r["efficiency"] <= 1.0
    assert pre["downtime"] < stop["downtime"]
    assert "| precopy | 14.0 MiB (2) | 1.5 MiB |" in proc.stdout


def test_repeats_auto_and_the_plot(tmp_path: Path) -> None:
    proc, out = _bench(
        tmp_path,
        *("--channels", "1,2", "--size", "1M", "--packet-sizes", "256K", "--devices", "1"),
        *("--sinks", "null", "--no-seq", "--max-repeats", "3"),
        plots=True,
        repeats="auto",
    )
    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["repeats"]["least"] == 3 and doc["meta"]["repeats"]["most"] == 3
    assert all(s["ok"] == 3 for s in doc["summary"])  # more: tests/unit/test_bench_repeats.py
    (advice,) = doc["meta"]["advice"]
    assert advice["channels"] in (1, 2) and advice["repeats"] >= 3
    assert "How many channels" in proc.stdout
    assert doc["meta"]["plots"] == [str(out / "downtime.png")]
    assert (out / "downtime.png").stat().st_size > 5_000
