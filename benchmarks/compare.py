"""vfiomig (native and pure) next to the C reference on the same transfer, as ratios.

Every receiver under test is a separate process fed by the same C sender (``cref_send``,
seeded), so the sender is never the limit and the receiver is what is measured. Runs of
the receivers are interleaved (C, native, pure, C, native, ...) and each figure is the
median of ``--repeat`` runs, so a neighbour's load on this 2-core machine hits all of them
alike. Throughput is state bytes over the time from the sender's start to the receiver's
exit (both receivers are up and listening before the clock starts).

Usage::

    .venv/bin/python -m benchmarks.compare                      # the issue's goal matrix
    .venv/bin/python -m benchmarks.compare --case 1M:4:null --repeat 5
    .venv/bin/python -m benchmarks.compare --rss                # 8 GiB, --max-queued 64MiB

A case is ``PACKET:CHANNELS:SINK`` with SINK ``null`` or ``pipe`` (a pipe enlarged to 1 MiB
drained by ``cref_drain``, the same for every receiver).

Receiver ``base`` (``base-pure``) is the native (pure-Python) core of another checkout, for
a before/after in one run:
``VFIOMIG_BASE=DIR`` names a directory holding that commit's ``vfiomig`` package with its
``_native`` built in place (``git archive COMMIT | tar -x -C DIR`` and
``python setup.py build_ext --inplace`` there)::

    VFIOMIG_BASE=/tmp/base .venv/bin/python -m benchmarks.compare --receivers cref,base,native
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.cref import DEFAULT_IDSTR, DEFAULT_UUID, build, start_sender, wait_ready
from vfiomig._units import parse_size

RECEIVERS = ("cref", "native", "pure")
GOAL_CASES = ["1M:4:null", "4K:4:null", "1M:4:pipe", "1M:1:null", "1M:16:null", "64K:4:null"]
_TMPFS = "/dev/shm" if os.path.isdir("/dev/shm") else None


@dataclass(frozen=True, slots=True)
class Case:
    packet: int
    channels: int
    sink: str
    size: int

    @classmethod
    def parse(cls, text: str, size: int | None) -> Case:
        packet, channels, sink = text.split(":")
        p = parse_size(packet)
        # Enough packets that the per-run setup is noise: 1 GiB of large packets,
        # 256 MiB of small ones.
        default = (1 << 30) if p >= (64 << 10) else (256 << 20)
        return cls(p, int(channels), sink, size or default)

    def __str__(self) -> str:
        return f"{self.packet >> 10}KiB x {self.channels}ch -> {self.sink}"


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    max_rss: int  # bytes, of the receiver
    cpu: float = 0.0  # user + system seconds of the receiver (less sensitive to neighbours)
    startup_cpu: float = 0.0  # ... of which before it was ready (outside the clock)
    faults: int = 0  # minor page faults of the receiver after it was ready


def _receiver_argv(
    kind: str, addr: str, case: Case, ready: Path, out: str, extra: list[str]
) -> list[str]:
    if kind == "cref":
        # cref_recv spells vfiomig's ``null:`` sink "null"; ``fd:N`` is the same for both.
        cref_out = "null" if out == "null:" else out
        return [
            str(build()["cref_recv"]),
            addr,
            str(case.channels),
            DEFAULT_UUID,
            cref_out,
            "--ready-file",
            str(ready),
            "--config",
            os.devnull,
        ]
    return [
        sys.executable,
        "-m",
        "vfiomig",
        "receive",
        "--listen",
        addr,
        "--channels",
        str(case.channels),
        "--uuid",
        DEFAULT_UUID,
        "--device",
        f"{DEFAULT_IDSTR}/0={out}",
        "--gate",
        "open",
        "--config-out",
        str(ready.parent),
        "--ready-file",
        str(ready),
        "--json",
        *extra,
    ]


def run_once(kind: str, case: Case, *, seed: int = 1, extra: list[str] | None = None) -> Run:
    """One transfer of ``case`` into receiver ``kind``; its time and the receiver's peak RSS."""
    env = dict(os.environ)
    env.pop("VFIOMIG_PUREPYTHON", None)
    env.pop("VFIOMIG_REQUIRE_NATIVE", None)
    if kind in ("pure", "base-pure"):
        env["VFIOMIG_PUREPYTHON"] = "1"
    elif kind in ("native", "base"):
        env["VFIOMIG_REQUIRE_NATIVE"] = "1"
    # `-m vfiomig` imports the package from the working directory first.
    cwd = os.environ["VFIOMIG_BASE"] if kind.startswith("base") else None
    drain = None
    pass_fds: tuple[int, ...] = ()
    out = "null:"
    # The config file goes to tmpfs, as /run/vfiomig in a deployment (README): on this
    # machine's disk its fsync alone costs 30 to 60 ms a run, which cref (config to
    # /dev/null) does not pay.
    with tempfile.TemporaryDirectory(prefix="vfiomig-bench-", dir=_TMPFS) as tmp:
        ready = Path(tmp) / "ready.json"
        wfd = -1
        if case.sink == "pipe":
            rfd, wfd = os.pipe()
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 1 << 20)
            drain = subprocess.Popen(
                [str(build()["cref_drain"])], stdin=rfd, stdout=subprocess.DEVNULL
            )
            os.close(rfd)
            out = f"fd:{wfd}"
            pass_fds = (wfd,)
        argv = _receiver_argv(kind, "tcp:127.0.0.1:0", case, ready, out, extra or [])
        recv = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            pass_fds=pass_fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if wfd >= 0:
            os.close(wfd)
        try:
            addr = wait_ready(ready, recv, timeout=30)[0]
            startup, startup_faults = _cpu_seconds(recv.pid), _minor_faults(recv.pid)
            t0 = time.perf_counter()
            send = start_sender(
                addr, channels=case.channels, size=case.size, packet_size=case.packet, seed=seed
            )
            _, rusage = _wait4(recv)
            seconds = time.perf_counter() - t0
            _, serr = send.communicate(timeout=60)
            if recv.returncode != 0 or send.returncode != 0:
                err = recv.stderr.read().decode(errors="replace") if recv.stderr else ""
                raise RuntimeError(
                    f"{kind} {case}: receiver {recv.returncode} sender "
                    f"{send.returncode}: {err[-2000:]} {serr.decode()[-500:]}"
                )
            cpu = rusage.ru_utime + rusage.ru_stime
            faults = rusage.ru_minflt - startup_faults
            return Run(seconds, rusage.ru_maxrss * 1024, cpu - startup, startup, faults)
        finally:
            for proc in (recv, drain):
                if proc is not None:
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait()
                    for stream in (proc.stdout, proc.stderr):
                        if stream:
                            stream.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _minor_faults(pid: int) -> int:
    """Minor page faults of a running process so far (/proc/PID/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[7])


def _wait4(proc: subprocess.Popen[bytes]) -> tuple[int, resource.struct_rusage]:
    # Read the receiver's output while waiting, then reap it with its own rusage.
    assert proc.stdout is not None
    proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status, rusage


Medians = dict[Case, dict[str, float]]


def compare(
    cases: list[Case], repeat: int, receivers: tuple[str, ...]
) -> tuple[Medians, Medians, Medians]:
    """Median seconds, median receiver CPU seconds and median receiver minor page faults
    (both after start-up, which is outside the clock) per (case, receiver), runs
    interleaved across receivers."""
    results: Medians = {}
    cpu: Medians = {}
    faults: Medians = {}
    for case in cases:
        times: dict[str, list[Run]] = {k: [] for k in receivers}
        for i in range(repeat):
            for kind in receivers:
                times[kind].append(run_once(kind, case, seed=1 + i))
        results[case] = {k: float(np.median([r.seconds for r in v])) for k, v in times.items()}
        cpu[case] = {k: float(np.median([r.cpu for r in v])) for k, v in times.items()}
        faults[case] = {k: float(np.median([r.faults for r in v])) for k, v in times.items()}
    return results, cpu, faults


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--case", action="append", help="PACKET:CHANNELS:SINK (repeatable)")
    ap.add_argument("--size", type=parse_size, default=None, help="state bytes per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--receivers", default=",".join(RECEIVERS))
    ap.add_argument("--rss", action="store_true", help="the 8 GiB peak-RSS check instead")
    args = ap.parse_args(argv)
    receivers = tuple(args.receivers.split(","))
    if args.rss:
        return rss_check(receivers)
    cases = [Case.parse(c, args.size) for c in (args.case or GOAL_CASES)]
    results, cpu, faults = compare(cases, args.repeat, receivers)
    print(
        f"{'case':<26}"
        + "".join(f"{k + ' GB/s':>13}" for k in receivers)
        + "".join(f"{k + '/cref':>13}" for k in receivers if k != "cref")
    )
    for case, med in results.items():
        gbps = {k: case.size / med[k] / 1e9 for k in receivers}
        row = f"{case!s:<26}" + "".join(f"{gbps[k]:>13.2f}" for k in receivers)
        if "cref" in receivers:
            row += "".join(f"{gbps[k] / gbps['cref']:>13.2f}" for k in receivers if k != "cref")
        print(row)
    # CPU time moves less with the neighbours' load than wall time does on this machine.
    # Start-up (imports, ~0.6 s for vfiomig) is left out, as from the clock.
    print(f"{'receiver CPU s (median)':<26}" + "".join(f"{k:>13}" for k in receivers))
    for case, med in cpu.items():
        print(f"{case!s:<26}" + "".join(f"{med[k]:>13.2f}" for k in receivers))
    print(f"{'page faults (median)':<26}" + "".join(f"{k:>13}" for k in receivers))
    for case, med in faults.items():
        print(f"{case!s:<26}" + "".join(f"{med[k]:>13.0f}" for k in receivers))
    by_channels = {c: med for c, med in results.items() if c.packet == 1 << 20 and c.sink == "null"}
    if len(by_channels) > 1:
        for kind in receivers:
            best = max(c.size / m[kind] for c, m in by_channels.items())
            for c, m in by_channels.items():
                print(
                    f"{kind}: {c.channels} channels at {c.size / m[kind] / best:.2f} x the best channel count"
                )
    print(json.dumps({str(c): m for c, m in results.items()}))
    return 0


def rss_check(receivers: tuple[str, ...]) -> int:
    """The 8 GiB transfer into each vfiomig receiver with ``--max-queued 64MiB``; exit
    status 1 when any receiver's peak RSS is over the limit."""
    case = Case(1 << 20, 4, "null", 8 << 30)
    limit = (64 << 20) + case.channels * case.packet + (80 << 20)
    over = []
    for kind in receivers:
        if kind == "cref":
            continue
        run = run_once(kind, case, extra=["--max-queued", str(64 << 20)])
        print(
            f"{kind}: 8 GiB in {run.seconds:.1f} s, peak RSS {run.max_rss >> 20} MiB"
            f" (limit {limit >> 20} MiB): {'ok' if run.max_rss <= limit else 'OVER'}"
        )
        if run.max_rss > limit:
            over.append(kind)
    if over:
        print(f"peak RSS over the limit: {', '.join(over)}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
