"""vfio-user migration data path: ceilings and vfiomig's client, side by side in one run.

    .venv/bin/python -m benchmarks.vfio_user.bench [--runs 3] [--size 1G] [--baseline REV]

Builds three C programs with gcc (``build/``, next to this file; ``--build-only`` stops
there, which is what ``vfiomig bench --sinks vfio-user-lvu`` needs): ``vu_raw`` (a forked
pair moving messages over a UNIX socket, each answered, a window in flight: the socket's
ceiling), ``vu_server`` (a device on libvfio-user whose stream has no fixed size) and
``vu_client`` (a minimal C vfio-user client: the client's ceiling). libvfio-user comes
from ``../shared/tools/build-libvfio-user`` (the test fixture's cached build).

Then, for each case, medians of ``--runs`` runs, interleaved: vfiomig's sink and source
(``benchmarks/vfio_user/pyclient.py``, the public classes) from this checkout, and the
same script against the vfio_user package of ``--baseline`` (a git revision, default the
commit before pipelining: one write in flight, every message copied) as "before". Each
server is a fresh process per run: libvfio-user's (``vu_server``) and vfiomig's own
(``benchmarks.vfio_user.null_device``, the same device in Python).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cref.bench import _wait_quiet
from tests.libvfio_user import build as build_libvfio_user
from vfiomig._units import parse_size
from vfiomig.transport import unix_socket_listening

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = HERE / "build"
#: The last commit with the one-write-in-flight client (its sink measured 112-135 MiB/s).
BASELINE = "2451db9"


def build() -> dict[str, str]:
    """Compile the C programs; returns the environment to run vu_server in."""
    lvu = build_libvfio_user()
    BUILD.mkdir(exist_ok=True)
    flags = ["-O2", "-Wall", "-Wextra", "-Werror"]
    for name, extra in (
        ("vu_raw", []),
        ("vu_client", []),
        (
            "vu_server",
            [
                f"-I{lvu.source / 'include'}",
                f"-L{lvu.libdir}",
                f"-Wl,-rpath,{lvu.libdir}",
                "-lvfio-user",
            ],
        ),
    ):
        src = HERE / f"{name}.c"
        subprocess.run(["gcc", *flags, "-o", str(BUILD / name), str(src), *extra], check=True)
    return lvu.env()


def baseline_tree(rev: str, dest: Path) -> Path:
    """Extract ``vfiomig/`` of ``rev`` into ``dest``; returns the PYTHONPATH root."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "vfiomig"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    tar = dest / "base.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest


@dataclass
class Case:
    name: str
    server: str  # "lvu", "own", "store", "store-direct" or "" (vu_raw needs none)
    client: list[str]  # argv; SOCK is replaced by the socket path
    pythonpath: str | None = None  # run the client with this tree (baseline)


def _reap(server: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for ``server`` (killed after ``timeout`` s); the CPU seconds it spent serving
    (vfiomig's server says so on stdout) or, for libvfio-user's, in all (user + sys)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(server.pid, os.WNOHANG)
        if pid:
            server.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            server.kill()
            deadline = float("inf")
        time.sleep(0.01)
    assert server.stdout is not None
    for line in server.stdout.read().decode(errors="replace").splitlines():
        if line.startswith('{"serve_cpu_s"'):
            return float(json.loads(line)["serve_cpu_s"])
    return usage.ru_utime + usage.ru_stime


def server_argv(kind: str, sock: str, size: str) -> list[str]:
    if kind == "lvu":
        return [str(BUILD / "vu_server"), sock, size]
    argv = [sys.executable, "-m", "benchmarks.vfio_user.null_device", sock, size, "--once"]
    if kind.startswith("store"):  # the stream kept in one buffer of the run's size
        argv += ["--store", size] + (["--direct"] if kind == "store-direct" else [])
    return argv


def run_case(
    case: Case, env: dict[str, str], size: str, tmp: Path
) -> tuple[float, float | None, float | None]:
    """One run: (MiB/s, the server's CPU seconds or None without a server, the Python
    client's CPU seconds in its data phase or None)."""
    sock = str(tmp / "s")
    server = None
    cpu = None
    if case.server:
        if os.path.exists(sock):
            os.unlink(sock)
        server = subprocess.Popen(
            server_argv(case.server, sock, size), env=env, cwd=ROOT, stdout=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        # libvfio-user binds, then listens; vfiomig's server links its path once listening.
        ready = unix_socket_listening if case.server == "lvu" else os.path.exists
        while not ready(sock):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{case.name}: server did not start")
            time.sleep(0.02)
    client_env = dict(env)
    if case.pythonpath:
        client_env["PYTHONPATH"] = case.pythonpath
        client_env["VFIOMIG_PUREPYTHON"] = "1"  # the extracted tree has no built core
    argv = [sock if a == "SOCK" else a for a in case.client]
    try:
        out = subprocess.run(
            argv, env=client_env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    finally:
        if server is not None:
            cpu = _reap(server, 10)
    if out.returncode != 0:
        raise RuntimeError(f"{case.name}: {out.stderr.strip() or out.stdout.strip()}")
    result = json.loads(out.stdout.splitlines()[-1])
    return float(result["mib_s"]), cpu, result.get("cpu_s")


def cases(size: str, base: str, base_window: int = 1) -> list[Case]:
    """Every case; the "before" ones run the baseline tree with ``base_window`` in flight
    (1: the one-at-a-time client; 0: the baseline's default window)."""
    py = [sys.executable, str(HERE / "pyclient.py"), "SOCK"]
    # pyclient takes bytes: it also runs on the baseline tree, which has no vfiomig._units.
    total, k32, m1 = (str(parse_size(s)) for s in (size, "32K", "1M"))
    c = [str(BUILD / "vu_client"), "SOCK"]
    bwin = str(base_window)
    bw = "default window" if base_window == 0 else f"{base_window} in flight"
    return [
        Case("raw UNIX socket, 1 MiB messages, 4 in flight", "", [str(BUILD / "vu_raw"), "1M", size, "4"]),
        Case("raw UNIX socket, 32 KiB messages, 16 in flight", "", [str(BUILD / "vu_raw"), "32K", size, "16"]),
        Case("libvfio-user <- C client, 32 KiB writes, 16 in flight", "lvu", [*c, "write", "32K", size, "16"]),
        Case("libvfio-user <- C client, 32 KiB writes, 64 in flight", "lvu", [*c, "write", "32K", size, "64"]),
        Case(f"libvfio-user <- vfiomig sink before (32 KiB, {bw})", "lvu", [*py, "write", k32, total, bwin], base),
        Case("libvfio-user <- vfiomig sink (32 KiB, default window)", "lvu", [*py, "write", k32, total, "0"]),
        Case("libvfio-user -> C client, 1 MiB reads, 4 in flight", "lvu", [*c, "read", "1M", "0", "4"]),
        Case(f"libvfio-user -> vfiomig source before (1 MiB, {bw})", "lvu", [*py, "read", "0", "0", bwin], base),
        Case("libvfio-user -> vfiomig source (1 MiB, default window)", "lvu", [*py, "read", "0", "0", "0"]),
        Case("vfiomig server <- C client, 1 MiB writes, 4 in flight", "own", [*c, "write", "1M", size, "4"]),
        Case(f"vfiomig server <- vfiomig sink before (1 MiB, {bw})", "own", [*py, "write", m1, total, bwin], base),
        Case("vfiomig server <- vfiomig sink (1 MiB, default window)", "own", [*py, "write", m1, total, "0"]),
        Case("storing server, write_data <- C client, 1 MiB writes, 4 in flight", "store", [*c, "write", "1M", size, "4"]),
        Case("storing server, write_buffer <- C client, 1 MiB writes, 4 in flight", "store-direct", [*c, "write", "1M", size, "4"]),
        Case("storing server, write_data <- vfiomig sink (1 MiB, default window)", "store", [*py, "write", m1, total, "0"]),
        Case("storing server, write_buffer <- vfiomig sink (1 MiB, default window)", "store-direct", [*py, "write", m1, total, "0"]),
        Case("vfiomig server -> C client, 1 MiB reads, 4 in flight", "own", [*c, "read", "1M", "0", "4"]),
        Case(f"vfiomig server -> vfiomig source before (1 MiB, {bw})", "own", [*py, "read", "0", "0", bwin], base),
        Case("vfiomig server -> vfiomig source (1 MiB, default window)", "own", [*py, "read", "0", "0", "0"]),
        Case("storing server, views -> C client, 1 MiB reads, 4 in flight", "store", [*c, "read", "1M", "0", "4"]),
        Case("storing server, views -> vfiomig source (1 MiB, default window)", "store", [*py, "read", "0", "0", "0"]),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="1G", help="bytes per run (K/M/G)")
    parser.add_argument("--baseline", default=BASELINE, help="git revision for 'before'")
    parser.add_argument(
        "--baseline-window",
        type=int,
        default=1,
        help="writes/reads in flight for 'before' (default 1; 0: the baseline's default)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run the cases whose name has this text (repeatable: any of them)",
    )
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--build-only", action="store_true", help="build the C programs (for vfiomig bench)"
    )
    args = parser.parse_args(argv)
    env = build()
    if args.build_only:
        print(BUILD)
        return
    with tempfile.TemporaryDirectory(prefix="vubench", dir="/tmp") as tmpdir:
        tmp = Path(tmpdir)
        base = str(baseline_tree(args.baseline, tmp))
        todo = [
            c
            for c in cases(args.size, base, args.baseline_window)
            if not args.only or any(o in c.name for o in args.only)
        ]
        results: dict[str, list[float]] = {c.name: [] for c in todo}
        cpus: dict[str, list[float]] = {c.name: [] for c in todo}
        client_cpus: dict[str, list[float]] = {c.name: [] for c in todo}
        for _ in range(args.runs):
            for case in todo:
                _wait_quiet(args.quiet_wait)
                mib_s, cpu, client_cpu = run_case(case, env, args.size, tmp)
                results[case.name].append(mib_s)
                if cpu is not None:
                    cpus[case.name].append(cpu)
                if client_cpu is not None:
                    client_cpus[case.name].append(client_cpu)
    medians = {name: statistics.median(v) for name, v in results.items()}
    for name, runs in results.items():
        cpu_s = statistics.median(cpus[name]) if cpus[name] else None
        client_s = statistics.median(client_cpus[name]) if client_cpus[name] else None
        if args.json:
            row = {"case": name, "median_mib_s": medians[name], "runs": runs}
            print(json.dumps(row | {"server_cpu_s": cpu_s, "client_cpu_s": client_s}))
        else:
            shown = ", ".join(f"{r:.0f}" for r in runs)
            note = "" if cpu_s is None else f"  [CPU s: server {cpu_s:.2f}"
            note += "" if client_s is None else f", client {client_s:.2f}"
            print(f"{medians[name]:8.0f} MiB/s  {name}  ({shown}){note}{']' if note else ''}")


if __name__ == "__main__":
    main()
