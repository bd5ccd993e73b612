"""Measure the C reference: cref_send -> cref_recv over TCP loopback, medians of N runs.

    .venv/bin/python -m benchmarks.cref.bench [--runs 3] [--size 1G] [--channels 4]
        [--packet-sizes 1M,4K] [--outputs null,pipe,pipe-cat] [--modes epoll,threads,writer-thread]

``pipe`` is a pipe enlarged to 1 MiB (F_SETPIPE_SZ) drained by cref_drain (1 MiB reads);
``pipe-cat`` the same pipe drained by ``cat > /dev/null``.  Before each run the script waits
(up to --quiet-wait seconds) for the machine to be idle, because on 2 cores any other busy
process halves the figure; the CPU idle share seen just before each run is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.cref import run_transfer
from vfiomig._units import parse_size


def _cpu_idle(interval: float = 0.3) -> float:
    """Share of CPU time idle over ``interval`` seconds (all cores), from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)

    idle0, total0 = sample()
    time.sleep(interval)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def _wait_quiet(limit: float, threshold: float = 0.9) -> float:
    deadline = time.monotonic() + limit
    idle = _cpu_idle()
    while idle < threshold and time.monotonic() < deadline:
        idle = _cpu_idle()
    return idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--packet-sizes", default="1M,4K")
    parser.add_argument("--outputs", default="null,pipe,pipe-cat")
    parser.add_argument("--modes", default="epoll,threads,writer-thread")
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args()

    for packet_size in [parse_size(p) for p in args.packet_sizes.split(",")]:
        for output in args.outputs.split(","):
            for mode in args.modes.split(","):
                figures, idles, peaks, cpu_rates = [], [], [], []
                for _ in range(args.runs):
                    idles.append(_wait_quiet(args.quiet_wait))
                    result = run_transfer(
                        channels=args.channels,
                        size=parse_size(args.size),
                        packet_size=packet_size,
                        output="pipe" if output.startswith("pipe") else output,
                        drainer=["cat"] if output == "pipe-cat" else None,
                        mode=mode,
                    )
                    figures.append(float(str(result.receiver["gbps"])))
                    peaks.append(int(str(result.receiver["peak_queued_bytes"])))
                    cpu = float(str(result.receiver["cpu_seconds"]))
                    cpu_rates.append(int(str(result.receiver["bytes"])) / max(cpu, 1e-9) / 1e9)
                case = {
                    "packet_size": packet_size,
                    "channels": args.channels,
                    "output": output,
                    "mode": mode,
                    "gbps_median": statistics.median(figures),
                    "gbps_runs": figures,
                    "idle_before": [round(i, 2) for i in idles],
                    "peak_queued_max": max(peaks),
                    # bytes per receiver CPU-second: what other load on the machine cannot skew
                    "recv_cpu_gbps_median": statistics.median(cpu_rates),
                }
                if args.json:
                    print(json.dumps(case), flush=True)
                else:
                    print(
                        f"{packet_size:>8} B  {args.channels} ch  {output:<8} {mode:<7} "
                        f"median {case['gbps_median']:.2f} GB/s  runs "
                        f"{' '.join(f'{g:.2f}' for g in figures)}  idle-before "
                        f"{' '.join(f'{i:.2f}' for i in idles)}  peak-queued "
                        f"{max(peaks) >> 20} MiB  recv GB per cpu-s "
                        f"{case['recv_cpu_gbps_median']:.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
