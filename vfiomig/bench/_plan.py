"""What a bench invocation runs: the scenarios' defaults, the matrix they expand to, and
the models in words.

The defaults live here once: the command line's help (`vfiomig.cli._bench`) is written
from these constants, `plan` applies them, and `describe_models` says what was applied,
in the table's header, in bench.json and in the plot titles. Help, table and JSON cannot
disagree about a default.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ._runner import Case, Models, _size, expand

#: QEMU's published setup (reference/qemu-multifd-vfio.md §5): 4 VFs, 1 VF alone took
#: 366 ms of which ~70 ms config load, so one device loads 100 MiB in ~296 ms.
QEMU_DEVICE_BW = 100 * 2**20 / 0.296
QEMU_CONFIG_SECONDS = 0.070
QEMU_CHANNELS = (1, 6, 8, 15)
QEMU_DEVICES = 4
QEMU_SIZE = 100 * 2**20
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
MATRIX_CONFIG_SECONDS = 0.01
PACKET_SIZE = 2**20
WRITE_LATENCY = 20e-6

#: ``--repeats auto``: at least MIN_REPEATS runs per cell, more while the spread is wide
#: (`_stats.needs_more`), at most ``--max-repeats``.
MIN_REPEATS = 3
MAX_REPEATS = 6

#: The precopy scenario's device (`_precopy`).
PRECOPY_SIZE = 48 * 2**20
PRECOPY_DEVICE_BW = 64 * 2**20


@dataclass(frozen=True, slots=True)
class Plan:
    """The cells to run, those that cannot run (with why), the models, the time scale
    and how many repeats: ``(least, most)``, equal when ``--repeats N`` fixed them."""

    cases: list[Case]
    skipped: list[tuple[Case, str]]
    models: Models
    scale: float
    repeats: tuple[int, int]


def plan(args: argparse.Namespace) -> Plan:
    """The bench ``args`` ask for, every default applied."""
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
        else (QEMU_CONFIG_SECONDS * scale if qemu else MATRIX_CONFIG_SECONDS),
        channel_rate=channel_rate,
        link_rate=args.link_rate or None,
        slow_rate=args.slow_rate,
        max_queued=args.max_queued,
    )
    cases, skipped = expand(
        args.channels or list(QEMU_CHANNELS if qemu else MATRIX_CHANNELS),
        args.packet_sizes or [PACKET_SIZE],
        args.devices or ([QEMU_DEVICES] if qemu else list(MATRIX_DEVICES)),
        args.size or [QEMU_SIZE if qemu else MATRIX_SIZE],
        args.orders or ["roundrobin"],
        args.transports,
        args.sinks or (["device"] if qemu else list(MATRIX_SINKS)),
    )
    if args.repeats is None:
        repeats = (MIN_REPEATS, max(MIN_REPEATS, args.max_repeats))
    else:
        repeats = (args.repeats, args.repeats)
    return Plan(cases, skipped, models, scale if qemu else 1.0, repeats)


def rate(bps: float | None) -> str:
    """``32 MiB/s``, ``84.5 MiB/s``, or ``unpaced``."""
    if not bps:
        return "unpaced"
    return f"{bps / 2**20:.1f}".removesuffix(".0") + " MiB/s"


def describe_models(models: Models, sinks: set[str] | None = None) -> list[str]:
    """The models of a bench, in words: the link first, then the device (when a device
    sink ran) and the config load. The table's header, bench.json and the plots use it."""
    link = f"link: {rate(models.channel_rate)} per channel"
    link += f", {rate(models.link_rate)} in all" if models.link_rate else ", no total limit"
    device = (
        f"device: {rate(models.device_bandwidth)}, {models.write_latency * 1e6:g} us per write"
        if sinks is None or "device" in sinks
        else "device: none (sinks " + ", ".join(sorted(sinks)) + ")"
    )
    config = f"config load {models.config_seconds * 1000:g} ms per device"
    queue = f"max queued {_size(models.max_queued)}"
    return [link, f"{device}; {config}; {queue}"]


def plural(n: int, word: str) -> str:
    """``1 channel``, ``2 channels``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


__all__ = [
    "MATRIX_CHANNELS",
    "MATRIX_CHANNEL_RATE",
    "MATRIX_DEVICES",
    "MATRIX_SINKS",
    "MATRIX_SIZE",
    "MAX_REPEATS",
    "MIN_REPEATS",
    "QEMU_CHANNELS",
    "QEMU_CONFIG_SECONDS",
    "QEMU_DEVICE_BW",
    "QEMU_TIME_SCALE",
    "Plan",
    "describe_models",
    "plan",
    "plural",
    "rate",
]
