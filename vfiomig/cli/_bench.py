"""``vfiomig bench``: its options (the command itself is `vfiomig.bench.bench_main`).

Every default in the help is written from the constants `vfiomig.bench._plan` applies,
so that the help says what a run really does (the matrix paces each channel; the qemu
scenario does not).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from vfiomig.bench._plan import (
    MATRIX_CHANNEL_RATE,
    MATRIX_CHANNELS,
    MATRIX_CONFIG_SECONDS,
    MATRIX_DEVICES,
    MATRIX_SINKS,
    MATRIX_SIZE,
    MAX_REPEATS,
    MIN_REPEATS,
    PACKET_SIZE,
    PRECOPY_DEVICE_BW,
    PRECOPY_SIZE,
    QEMU_CHANNELS,
    QEMU_CONFIG_SECONDS,
    QEMU_DEVICE_BW,
    QEMU_DEVICES,
    QEMU_SIZE,
    QEMU_TIME_SCALE,
    WRITE_LATENCY,
)
from vfiomig.bench._runner import ORDERS, TRANSPORTS, _size
from vfiomig.bench._sinks import SINK_KINDS
from vfiomig.cli._options import size

UNITS = "K/M/G/T suffixes (binary)"


def _list(conv: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [conv(t) for t in text.split(",") if t]
        except Exception as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(allowed)}")
        return items

    return parse


def _repeats(text: str) -> int | None:
    """``auto`` (None) or a count of at least 1."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count or auto") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} repeats: at least 1")
    return n


def _csv(values: tuple[Any, ...]) -> str:
    return ",".join(str(v) for v in values)


def _mib(bps: float) -> str:
    return f"{bps / 2**20:.1f}".removesuffix(".0") + "M"


def add_parser(sub: Any) -> None:
    """Add ``bench`` to the command line's subparsers."""
    qemu_bw = QEMU_DEVICE_BW / QEMU_TIME_SCALE
    b = sub.add_parser(
        "bench",
        help="benchmark channel counts x packet sizes x sink models",
        description="Measure vfiomig's downtime against the lower bound of each run (the"
        " device, config and link models), beside a sequential baseline and the C reference,"
        " and say how many channels to use. Tables and advice go to stdout, progress to"
        " stderr; CSV, JSON and plots to --out. Choosing a channel count with it:"
        " docs/choosing-channels.md.",
    )
    b.add_argument(
        "--scenario",
        choices=("matrix", "qemu", "precopy"),
        default="matrix",
        help=f"matrix: the dimensions below; qemu: QEMU's published {QEMU_DEVICES}-VF setup"
        f" ({_csv(QEMU_CHANNELS)} channels, {QEMU_DEVICES} x {_size(QEMU_SIZE)}) beside QEMU's"
        " downtimes; precopy: a kernel VFIO device model migrated with PRE_COPY and without,"
        " side by side; default matrix",
    )
    b.add_argument(
        "--channels",
        type=_list(int),
        default=None,
        metavar="N,N,...",
        help=f"channel counts; default {_csv(MATRIX_CHANNELS)} (qemu: {_csv(QEMU_CHANNELS)})",
    )
    b.add_argument(
        "--packet-sizes",
        type=_list(size),
        default=None,
        metavar="SIZE,...",
        help=f"packet payload sizes, {UNITS}; default {_size(PACKET_SIZE)}",
    )
    b.add_argument(
        "--devices",
        type=_list(int),
        default=None,
        metavar="N,N,...",
        help=f"device counts; default {_csv(MATRIX_DEVICES)} (qemu: {QEMU_DEVICES})",
    )
    b.add_argument(
        "--size",
        type=_list(size),
        default=None,
        metavar="SIZE,...",
        help=f"state per device, {UNITS}; default {_size(MATRIX_SIZE)} (qemu:"
        f" {_size(QEMU_SIZE)}; precopy: {_size(PRECOPY_SIZE)} of initial state)",
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
        f" libvfio-user, when benchmarks/vfio_user is built); default {_csv(MATRIX_SINKS)}"
        " (qemu: device)",
    )
    b.add_argument(
        "--device-bw",
        type=size,
        default=None,
        metavar="SIZE_PER_S",
        help=f"device model bandwidth in bytes per second, {UNITS}; default the qemu"
        f" scenario's per device: {_mib(QEMU_DEVICE_BW)} / {QEMU_TIME_SCALE:g} (--time-scale)"
        f" = {_mib(qemu_bw)} (precopy: {_mib(PRECOPY_DEVICE_BW)})",
    )
    b.add_argument(
        "--write-latency",
        type=float,
        default=WRITE_LATENCY,
        metavar="SECONDS",
        help=f"device model: fixed time per write; default {WRITE_LATENCY:g}",
    )
    b.add_argument(
        "--config-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"config load time per device; default {MATRIX_CONFIG_SECONDS:g}"
        f" (qemu: {QEMU_CONFIG_SECONDS:g} x --time-scale)",
    )
    b.add_argument(
        "--channel-rate",
        type=size,
        default=None,
        metavar="SIZE_PER_S",
        help=f"pace each channel's sender to this many bytes per second (one link per"
        f" channel), {UNITS}, 0 for unpaced; default {_size(MATRIX_CHANNEL_RATE)} in the matrix"
        " (so that the channel count matters), unpaced in the qemu scenario",
    )
    b.add_argument(
        "--link-rate",
        type=size,
        default=None,
        metavar="SIZE_PER_S",
        help=f"pace all channels together to this many bytes per second, {UNITS};"
        " default: no total limit",
    )
    b.add_argument(
        "--slow-rate",
        type=size,
        default=16 * 2**20,
        metavar="SIZE_PER_S",
        help=f"order slow: the slow channel's bytes per second, {UNITS}; default 16M",
    )
    b.add_argument(
        "--max-queued",
        type=size,
        default=256 * 2**20,
        metavar="SIZE",
        help=f"the receiver's --max-queued, {UNITS}; default 256M",
    )
    b.add_argument(
        "--time-scale",
        type=float,
        default=None,
        metavar="FACTOR",
        help="qemu scenario: divide device bandwidth and multiply config time by this"
        f" (default {QEMU_TIME_SCALE:g}: this machine's receiver cannot take"
        f" {QEMU_DEVICES} x {_mib(QEMU_DEVICE_BW)}/s)",
    )
    b.add_argument(
        "--repeats",
        type=_repeats,
        default=None,
        metavar="N|auto",
        help=f"runs per cell; auto: {MIN_REPEATS}, then more for the cells whose spread"
        " hides the answer, up to --max-repeats; default auto (precopy: auto is"
        f" {MIN_REPEATS})",
    )
    b.add_argument(
        "--max-repeats",
        type=int,
        default=MAX_REPEATS,
        metavar="N",
        help=f"--repeats auto: at most this many runs per cell; default {MAX_REPEATS}",
    )
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


__all__ = ["add_parser"]
