"""``vfiomig bench --scenario precopy``: downtime with PRE_COPY next to without, same run.

The source is a kernel VFIO device model (`FakeVfioDevice` behind the real `VfioSource`,
in the sender's child process) with ``initial`` bytes of state it can give while
running, dirty bytes per precopy round (``initial`` / 6, / 24, / 96) and ``initial`` / 12
bytes that only STOP_COPY gives. The destination is the device model sink (``--device-bw``,
``--write-latency``) with the config model (``--config-time``), in a receive session with
its control server, here.

Each repeat migrates the same device twice: ``precopy`` (rounds until at most
``PRECOPY_THRESHOLD`` is pending, then the rest) and ``stop-copy`` (``--precopy-rounds 0``:
everything while stopped). Downtime runs from the moment the source device stops (the
sender's SET STOP_COPY, CLOCK_MONOTONIC in both processes) to the device loaded at the
receiver (config replayed, sink finished). Its bound: the bytes read after the stop over
the device bandwidth, plus the config time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from vfiomig.control import ControlServer
from vfiomig.receive import DeviceSetup, MigrationFailed, ReceiverConfig, Session, serve_receiver

from ._model import ConfigModel, DeviceModelSink, lower_bound
from ._plan import MIN_REPEATS, PRECOPY_DEVICE_BW, PRECOPY_SIZE, plural
from ._report import _stats
from ._runner import UUID, _sender

MODES = ("precopy", "stop-copy")
IDSTR = "0000:00:04.0/vfio"
PRECOPY_THRESHOLD = 1 << 20
CHANNELS = 4
PACKET = 1 << 20


def device_model(initial: int, seed: int) -> dict[str, Any]:
    """The saving model's parameters (`SavingModel` keywords) for ``initial`` bytes."""
    return {
        "initial": initial,
        "dirty": [initial // 6, initial // 24, initial // 96],
        "stop_copy": initial // 12,
        "seed": seed,
    }


async def run_one(
    mode: str, model: dict[str, Any], bandwidth: float, latency: float, config_seconds: float
) -> dict[str, Any]:
    """One migration; its downtime, bound and what the sender reported."""
    sink = DeviceModelSink(bandwidth, latency)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vfiomig-bench-") as tmp:
        control = ControlServer(f"unix:{os.path.join(tmp, 'ctl')}", progress_interval=0.05)
        config = ReceiverConfig(
            uuid=UUID,
            channels=CHANNELS,
            devices=[DeviceSetup(IDSTR, 0, sink, ConfigModel(config_seconds))],
            listen=[f"unix:{os.path.join(tmp, 'data')}"],
            config_target=control.config_target,
        )
        sent: dict[str, Any] = {}
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:

                async def serve(task_status: trio.TaskStatus[Session]) -> None:
                    try:
                        await serve_receiver(
                            config, task_status=task_status, extra_tasks=[control.serve]
                        )
                    except MigrationFailed as exc:
                        failures.append(str(exc))

                session: Session = await nursery.start(serve)
                job = {
                    "mode": "vfio",
                    "connect": session.bound,
                    "control": control.bound,
                    "channels": CHANNELS,
                    "uuid": UUID.hex(),
                    "idstr": IDSTR,
                    "packet_size": PACKET,
                    "model": model,
                    "rounds": 8 if mode == "precopy" else 0,
                    "threshold": PRECOPY_THRESHOLD,
                }
                try:
                    await _sender(job, sent)
                except (RuntimeError, OSError) as exc:
                    failures.append(str(exc))
                    session.abort("the sender failed")
    device = next(iter(session.devices.values()))
    if failures or device.loaded_at is None:
        return {"mode": mode, "ok": False, "error": "; ".join(failures) or "not loaded"}
    offset = trio.current_time() - time.monotonic()
    downtime = device.loaded_at - (float(sent["t_stop"]) + offset)
    after_stop = int(sent["bytes"])
    bound = lower_bound([after_stop], device_bandwidth=bandwidth, config_seconds=config_seconds)
    return {
        "mode": mode,
        "ok": True,
        "downtime": downtime,
        "bound": bound.seconds,
        "efficiency": bound.seconds / downtime,
        "bytes_after_stop": after_stop,
        "precopy_bytes": int(sent.get("precopy_bytes", 0)),
        "precopy_rounds": int(sent.get("precopy_rounds", 0)),
        "precopy_seconds": float(sent["t_stop"]) - float(sent["t_start"]),
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Median (min..max) per mode over the repeats, and the summaries."""
    lines = [
        "| mode | precopy sent (rounds) | read after stop | downtime | bound | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    summaries: list[dict[str, Any]] = []
    for mode in MODES:
        ok = [r for r in rows if r["mode"] == mode and r["ok"]]
        if not ok:
            lines.append(f"| {mode} | failed | | | | |")
            continue
        s: dict[str, Any] = {
            m: _stats([r[m] for r in ok]) for m in ("downtime", "bound", "efficiency")
        }
        s.update(mode=mode, runs=len(ok), bytes_after_stop=ok[0]["bytes_after_stop"])
        s.update(precopy_bytes=ok[0]["precopy_bytes"], precopy_rounds=ok[0]["precopy_rounds"])
        summaries.append(s)
        d = s["downtime"]
        lines.append(
            f"| {mode} | {_mib(s['precopy_bytes'])} ({s['precopy_rounds']}) "
            f"| {_mib(s['bytes_after_stop'])} "
            f"| {d['median'] * 1000:.0f} ms ({d['min'] * 1000:.0f}..{d['max'] * 1000:.0f}) "
            f"| {s['bound']['median'] * 1000:.0f} ms | {s['efficiency']['median']:.2f} |"
        )
    return "\n".join(lines), summaries


async def run_precopy_bench(args: argparse.Namespace, out: Path) -> int:
    """Both modes, ``--repeats`` times, alternating; a table on stdout, JSON in ``out``."""
    initial = (args.size or [PRECOPY_SIZE])[0]
    bandwidth = args.device_bw or PRECOPY_DEVICE_BW
    repeats = args.repeats or MIN_REPEATS  # auto: no advice to firm up here
    config_seconds = 0.01 if args.config_time is None else args.config_time
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for repeat in range(repeats):
        model = device_model(initial, args.seed + repeat)
        for mode in MODES:
            row = await run_one(mode, model, bandwidth, args.write_latency, config_seconds)
            rows.append({"repeat": repeat, **row})
            print(
                f"precopy bench: repeat {repeat} {mode}: {row.get('error', 'ok')}", file=sys.stderr
            )
    text, summaries = table(rows)
    print(
        f"precopy scenario: device state {_mib(initial)} initial + dirty "
        f"{_mib(initial // 6)}, {_mib(initial // 24)}, {_mib(initial // 96)} per round + "
        f"{_mib(initial // 12)} stop-copy; device model {bandwidth / 2**20:.0f} MiB/s, "
        f"config {config_seconds * 1000:g} ms; threshold {_mib(PRECOPY_THRESHOLD)}; "
        f"{plural(repeats, 'repeat')}, {time.perf_counter() - t0:.1f} s"
    )
    print(text)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, after the runs
    meta = {
        "command": "vfiomig " + " ".join(sys.argv[1:]),
        "initial": initial,
        "device_bandwidth": bandwidth,
        "config_seconds": config_seconds,
        "threshold": PRECOPY_THRESHOLD,
    }
    (out / "precopy.json").write_text(
        json.dumps({"meta": meta, "runs": rows, "summaries": summaries}, indent=1)
    )
    print(f"wrote {out / 'precopy.json'}")
    return 0 if all(r["ok"] for r in rows) else 1
