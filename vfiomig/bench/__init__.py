"""``vfiomig bench``: how many channels and which packet size, measured on this machine.

Modules: `_runner` (matrix, runs), `_precopy` (downtime with PRE_COPY next to without),
`_model` (device and config models, lower bound),
`_sinks` (sink models), `_seq` (the vhost-user style sequential baseline), `_sendproc`
(the sender process), `_report` (statistics, table, CSV, JSON), `_plots` (PNG, optional).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from vfiomig._logs import event
from vfiomig._public import claim

from ._model import Bound, ConfigModel, DeviceModelSink, Overhead, lower_bound
from ._runner import (
    ORDERS,
    TRANSPORTS,
    Case,
    Models,
    Run,
    cref_reason,
    expand,
    load_cref,
    run_cref,
    run_sequential,
    run_vfiomig,
    seeds,
)
from ._sinks import SINK_KINDS
from ._verdict import channel_advice, qemu_table

log = logging.getLogger("vfiomig.bench")

#: QEMU's published setup (reference/qemu-multifd-vfio.md §5): 4 VFs, 1 VF alone took
#: 366 ms of which ~70 ms config load, so one device loads 100 MiB in ~296 ms.
QEMU_DEVICE_BW = 100 * 2**20 / 0.296
QEMU_CONFIG_SECONDS = 0.070
QEMU_CHANNELS = (1, 6, 8, 15)
#: The qemu scenario divides device bandwidth (and multiplies config time) by this: this
#: machine's receiver cannot take 4 x 338 MiB/s.
QEMU_TIME_SCALE = 4.0

#: The default matrix answers "how many channels": each channel is a link of
#: MATRIX_CHANNEL_RATE (one paced TCP flow), into a null sink (the link and this machine
#: bound it) and into device models loading at the qemu scenario's per-device bandwidth,
#: for 1 and 2 devices, so that the channel count where the devices saturate shows.
MATRIX_CHANNELS = (1, 2, 4, 8)
MATRIX_DEVICES = (1, 2)
MATRIX_SINKS = ("null", "device")
MATRIX_SIZE = 16 * 2**20
MATRIX_CHANNEL_RATE = 32 * 2**20


def _list(conv: Any) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [conv(t) for t in text.split(",") if t]
        except Exception as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _choices(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(allowed)}")
        return items

    return parse


def add_parser(sub: Any, size: Any) -> None:
    """Add ``bench`` to the command line's subparsers (``size`` parses 64M and the like)."""
    units = "K/M/G/T suffixes (binary)"
    b = sub.add_parser(
        "bench",
        help="benchmark channel counts x packet sizes x sink models",
        description="Measure vfiomig's downtime against the lower bound of each run (the"
        " device, config and link models), beside a sequential baseline and the C reference."
        " Tables and notes go to stdout, progress to stderr; CSV, JSON and plots to --out.",
    )
    b.add_argument(
        "--scenario",
        choices=("matrix", "qemu", "precopy"),
        default="matrix",
        help="matrix: the dimensions below; qemu: QEMU's published 4-VF setup (1/6/8/15"
        " channels, 4 x 100 MiB) beside QEMU's downtimes; precopy: a kernel VFIO device"
        " model migrated with PRE_COPY and without, side by side; default matrix",
    )
    b.add_argument(
        "--channels",
        type=_list(int),
        default=None,
        metavar="N,N,...",
        help="channel counts; default 1,2,4,8 (qemu: 1,6,8,15)",
    )
    b.add_argument(
        "--packet-sizes",
        type=_list(size),
        default=None,
        metavar="SIZE,...",
        help=f"packet payload sizes, {units}; default 1M",
    )
    b.add_argument(
        "--devices",
        type=_list(int),
        default=None,
        metavar="N,N,...",
        help="device counts; default 1,2 (qemu: 4)",
    )
    b.add_argument(
        "--size",
        type=_list(size),
        default=None,
        metavar="SIZE,...",
        help=f"state per device, {units}; default 16M (qemu: 100M)",
    )
    b.add_argument(
        "--orders",
        type=_choices(ORDERS),
        default=None,
        metavar=",".join(ORDERS),
        help="packet orders over the channels (slow: one channel at --slow-rate);"
        " default roundrobin",
    )
    b.add_argument(
        "--transports",
        type=_choices(TRANSPORTS),
        default=["tcp"],
        metavar="tcp,unix",
        help="loopback TCP or UNIX sockets; default tcp",
    )
    b.add_argument(
        "--sinks",
        type=_choices(SINK_KINDS),
        default=None,
        metavar=",".join(SINK_KINDS),
        help="sink models: null (discard), pipe (drained by cat), tmpfs (a file in"
        " /dev/shm), device (a device loading at --device-bw), vfio-user (vfiomig's own"
        " vfio-user server, a null device per device), vfio-user-lvu (the same on"
        " libvfio-user, when benchmarks/vfio_user is built); default null,device"
        " (qemu: device)",
    )
    b.add_argument(
        "--device-bw",
        type=size,
        default=None,
        metavar="SIZE_PER_S",
        help=f"device model bandwidth in bytes per second, {units}; default the qemu"
        " scenario's per device: 338M / 4 = 84.5M",
    )
    b.add_argument(
        "--write-latency",
        type=float,
        default=20e-6,
        metavar="SECONDS",
        help="device model: fixed time per write; default 0.00002",
    )
    b.add_argument(
        "--config-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="config load time per device; default 0.01 (qemu: 0.070 x --time-scale)",
    )
    b.add_argument(
        "--channel-rate",
        type=size,
        default=None,
        metavar="SIZE_PER_S",
        help=f"pace each channel's sender to this many bytes per second, {units}; default: unpaced",
    )
    b.add_argument(
        "--link-rate",
        type=size,
        default=None,
        metavar="SIZE_PER_S",
        help=f"pace all channels together to this many bytes per second, {units}; default: unpaced",
    )
    b.add_argument(
        "--slow-rate",
        type=size,
        default=16 * 2**20,
        metavar="SIZE_PER_S",
        help=f"order slow: the slow channel's bytes per second, {units}; default 16M",
    )
    b.add_argument(
        "--max-queued",
        type=size,
        default=256 * 2**20,
        metavar="SIZE",
        help=f"the receiver's --max-queued, {units}; default 256M",
    )
    b.add_argument(
        "--time-scale",
        type=float,
        default=None,
        metavar="FACTOR",
        help="qemu scenario: divide device bandwidth and multiply config time by this"
        " (default 4: this machine's receiver cannot take 4 x 338 MiB/s)",
    )
    b.add_argument("--repeats", type=int, default=2, metavar="N", help="runs per cell; default 2")
    b.add_argument(
        "--seed", type=int, default=1, help="seed of the random orders and states; default 1"
    )
    b.add_argument("--no-seq", action="store_true", help="skip the sequential baseline")
    b.add_argument(
        "--cref",
        action="store_true",
        help="also run the C reference (benchmarks/cref) where it can: sinks other than"
        " device, one pacing rate for all channels; default: off (about 40%% more runs)",
    )
    b.add_argument("--no-cref", action="store_true", help=argparse.SUPPRESS)  # the old default
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument(
        "--out",
        default="bench-out",
        metavar="DIR",
        help="where runs.csv, bench.json and the plots go; default bench-out",
    )


def _plan(args: argparse.Namespace) -> tuple[list[Case], list[tuple[Case, str]], Models, float]:
    qemu = args.scenario == "qemu"
    scale = args.time_scale or QEMU_TIME_SCALE
    if args.channel_rate is not None:
        channel_rate = args.channel_rate or None  # 0: unpaced
    else:
        channel_rate = None if qemu else MATRIX_CHANNEL_RATE
    models = Models(
        device_bandwidth=args.device_bw or QEMU_DEVICE_BW / scale,
        write_latency=args.write_latency,
        config_seconds=args.config_time
        if args.config_time is not None
        else (QEMU_CONFIG_SECONDS * scale if qemu else 0.01),
        channel_rate=channel_rate,
        link_rate=args.link_rate,
        slow_rate=args.slow_rate,
        max_queued=args.max_queued,
    )
    cases, skipped = expand(
        args.channels or list(QEMU_CHANNELS if qemu else MATRIX_CHANNELS),
        args.packet_sizes or [2**20],
        args.devices or ([4] if qemu else list(MATRIX_DEVICES)),
        args.size or [100 * 2**20 if qemu else MATRIX_SIZE],
        args.orders or ["roundrobin"],
        args.transports,
        args.sinks or (["device"] if qemu else list(MATRIX_SINKS)),
    )
    return cases, skipped, models, scale if qemu else 1.0


async def _bench(args: argparse.Namespace, out: Path) -> int:
    from ._plots import make_plots
    from ._report import Progress, summarise, table, write_csv, write_json

    cases, skipped, models, scale = _plan(args)
    cref = load_cref() if args.cref and not args.no_cref else None
    jobs: list[tuple[str, Case]] = []
    seq_done: set[tuple[Any, ...]] = set()
    notes = [f"skipped {c.label}: {why}" for c, why in skipped]
    if cref is None and args.cref:
        notes.append("C reference: benchmarks/cref not found, baseline skipped")
    for case in cases:
        jobs.append(("vfiomig", case))
        key = (case.packet_size, case.devices, case.size, case.transport, case.sink)
        if not args.no_seq and key not in seq_done:
            seq_done.add(key)
            jobs.append(("seq", case))
        if cref is not None:
            why = cref_reason(case, models)
            if why is None:
                jobs.append(("cref", case))
            elif case.sink != "device":
                notes.append(f"C reference skipped for {case.label}: {why}")
    progress = Progress(len(jobs) * args.repeats)
    runs: list[Run] = []
    t_start = time.perf_counter()
    for repeat, seed in seeds(args.seed, args.repeats):
        for kind, case in jobs:
            progress.start(f"{kind} {case.label}")
            if kind == "vfiomig":
                run = await run_vfiomig(case, models, repeat, seed, progress.tick)
            elif kind == "seq":
                run = await run_sequential(case, models, repeat, seed, progress.tick)
            else:
                run = await run_cref(cref, case, models, repeat, seed)
            runs.append(run)
            progress.finish_run(run)
    progress.close()
    wall = time.perf_counter() - t_start
    t0 = time.perf_counter()
    summaries = summarise(runs)
    meta: dict[str, Any] = {
        "command": "vfiomig " + " ".join(sys.argv[1:]) if sys.argv else "vfiomig bench",
        "scenario": args.scenario,
        "time_scale": scale,
        "models": {
            "device_bandwidth": models.device_bandwidth,
            "write_latency": models.write_latency,
            "config_seconds": models.config_seconds,
            "channel_rate": models.channel_rate,
            "link_rate": models.link_rate,
            "slow_rate": models.slow_rate,
            "max_queued": models.max_queued,
        },
        "repeats": args.repeats,
        "seed": args.seed,
        "processes": "receiver in the bench process (trio); sender in a child process"
        " (python -m vfiomig.bench._sendproc); C reference: both ends in child processes",
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "uname": platform.platform(),
        },
        "wall_seconds": wall,
        "notes": notes,
    }
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, after the runs
    write_csv(out / "runs.csv", runs)
    print(table(summaries))
    ok = [r for r in runs if r.ok and r.kind != "cref"]
    frac = max((r.harness_seconds / r.downtime for r in ok), default=math.nan)
    report_seconds = time.perf_counter() - t0
    meta["harness"] = {
        "max_fraction_of_run": frac,
        "summary_seconds": report_seconds,
        "how": "perf_counter time in harness code inside the receiver process during a run"
        " (device-model bookkeeping, progress ticks) over that run's downtime",
    }
    effs = [s["efficiency"]["min"] for s in summaries if s["kind"] == "vfiomig"]
    effs = [e for e in effs if not math.isnan(e)]
    if effs:
        print(f"efficiency (vfiomig, worst repeat): min {min(effs):.3f}, over {len(effs)} cells")
    print(
        f"harness overhead: at most {frac * 100:.3f}% of a run (goal < 2%);"
        f" statistics and output {report_seconds * 1000:.0f} ms after {wall:.1f} s of runs"
    )
    advice = channel_advice(summaries, meta["models"])
    if advice:
        print("\n".join(advice))
    if args.scenario == "qemu":
        _qemu_note(summaries, models, scale, meta)
    for note in notes:
        log.warning("%s", note, extra=event("bench_note"))
    if args.no_plots:
        meta["plots"] = "plots skipped: --no-plots"
    else:
        plots = make_plots(summaries, out)
        meta["plots"] = plots if isinstance(plots, str) else [str(p) for p in plots]
        print(plots if isinstance(plots, str) else "plots: " + ", ".join(str(p) for p in plots))
    write_json(out / "bench.json", meta, runs, summaries)
    print(f"wrote {out / 'runs.csv'} and {out / 'bench.json'}")
    return 0 if all(r.ok for r in runs) else 1


def _qemu_note(summaries: list[Any], models: Models, scale: float, meta: dict[str, Any]) -> None:
    lines = [
        f"QEMU-shaped scenario: 4 devices x 100 MiB, device {models.device_bandwidth / 2**20:.1f}"
        f" MiB/s, config {models.config_seconds * 1000:.0f} ms (QEMU's figures with time x{scale:g})",
    ]
    for s in summaries:
        if s["kind"] == "vfiomig":
            lines.append(
                f"  {s['channels']:>2} channels: vfiomig efficiency {s['efficiency']['median']:.3f}"
                f" (min {s['efficiency']['min']:.3f}), downtime {s['downtime']['median']:.3f} s,"
                f" bound {s['bound']['median']:.3f} s"
            )
    table_lines, meta["qemu"] = qemu_table(summaries, scale)
    bound_unscaled = 100 * 2**20 / QEMU_DEVICE_BW + QEMU_CONFIG_SECONDS
    meta["qemu"]["bound_unscaled_ms"] = bound_unscaled * 1000
    lines += table_lines
    lines.append(
        f"  (on QEMU's own scale the device model's bound is {bound_unscaled * 1000:.0f} ms;"
        " QEMU's downtimes include more than device state: compare the shape, not the values)"
    )
    print("\n".join(lines))


async def bench_main(args: argparse.Namespace) -> int:
    """Run ``vfiomig bench`` (``vfiomig.cli._main.main`` calls it under ``trio.run``)."""
    # The per-run lines are the bench's progress off a terminal: shown without -v.
    log.setLevel(min(logging.INFO, logging.getLogger("vfiomig").getEffectiveLevel()))
    if args.repeats < 1:
        log.error("error: --repeats must be at least 1", extra=event("usage_error"))
        return 2
    if args.scenario == "precopy":
        from ._precopy import run_precopy_bench

        return await run_precopy_bench(args, Path(args.out))
    return await _bench(args, Path(args.out))


__all__ = [
    "Bound",
    "Case",
    "ConfigModel",
    "DeviceModelSink",
    "Models",
    "Overhead",
    "Run",
    "add_parser",
    "lower_bound",
    "bench_main",
]

claim(__name__, globals(), __all__)
