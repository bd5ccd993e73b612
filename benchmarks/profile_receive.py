"""Profile ``vfiomig receive`` under py-spy while the C sender feeds it; print the top frames.

Usage::

    .venv/bin/python -m benchmarks.profile_receive 4K:4 [--pure] [--top 15] [--native]

Each sample's leaf frame counts as "self" time; the frames of the channel and loader
tasks, the event loop and the sink are what the table shows. py-spy's ``--native`` adds C
frames (the kernel's recv/epoll time shows as the syscall wrappers).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.compare import Case, _receiver_argv
from benchmarks.cref import start_sender, wait_ready
from vfiomig._units import parse_size

_STARTUP = ("_bootstrap", "argparse", "attr/_make", "dataclasses.py", "_cli.py:main")


def profile(case: Case, *, pure: bool, top: int, native: bool) -> list[tuple[str, float]]:
    env = dict(os.environ)
    env.pop("VFIOMIG_PUREPYTHON", None)
    if pure:
        env["VFIOMIG_PUREPYTHON"] = "1"
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="vfiomig-prof-") as tmp:
        ready = Path(tmp) / "ready.json"
        raw = Path(tmp) / "raw.txt"
        argv = _receiver_argv("native", "tcp:127.0.0.1:0", case, ready, "null:", [])
        spy = [pyspy, "record", "-r", "500", "-f", "raw", "-o", str(raw), "--nonblocking"]
        if native:
            spy.append("--native")
        recv = subprocess.Popen(
            [*spy, "--", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_ready(ready, recv, timeout=30)
        send = start_sender(
            wait_ready(ready, recv)[0],
            channels=case.channels,
            size=case.size,
            packet_size=case.packet,
        )
        send.communicate(timeout=120)
        recv.wait(timeout=120)
        counts: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if any(s in stack for s in _STARTUP):
                continue  # imports and argument parsing before the listener is up
            # Aggregate by function: drop the line number.
            leaf = re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1]) or "(native)"
            counts[leaf] += int(n)
            total += int(n)
    return [(name, 100.0 * n / total) for name, n in counts.most_common(top)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", help="PACKET:CHANNELS, e.g. 4K:4")
    ap.add_argument("--pure", action="store_true")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--size", default=None)
    args = ap.parse_args()
    case = Case.parse(args.case + ":null", parse_size(args.size) if args.size else None)
    print(f"# {case} ({'pure' if args.pure else 'default'} core), self time of leaf frames")
    for name, pct in profile(case, pure=args.pure, top=args.top, native=args.native):
        print(f"{pct:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
