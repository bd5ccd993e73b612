"""`vfiomig send` next to the C sender (``cref_send``) into the same receiver, as ratios.

Every sender under test is a separate process sending one device to a fresh receiver
(``vfiomig receive`` with the native core and a null sink by default, ``--receiver cref``
for the C reference receiver); runs are interleaved across senders and each figure is the
median of ``--repeat`` runs, so a neighbour's load on this 2-core machine hits all of them
alike. Throughput is state bytes over the receiver's session time (its ``--json``
``seconds``: from the first packet to the end; cref_recv: its own clock), so that the
Python sender's start-up (imports, ~0.4 s) is outside the clock for both; the wall time
from the sender's start to the receiver's exit is printed too.

Sender CPU seconds: cref_send's whole process (its start-up is nothing); vfiomig send's
``cpu_seconds`` from its ``--json`` summary (the process's CPU time during the send, every
thread, start-up left out). Per GiB of state.

Usage::

    .venv/bin/python -m benchmarks.compare_send                  # the issue's goal matrix
    .venv/bin/python -m benchmarks.compare_send --case 4K:4:synth --repeat 5
    .venv/bin/python -m benchmarks.compare_send --senders cref,send,pure --case 1M:4:file

A case is ``PACKET:CHANNELS:SOURCE``; SOURCE is what `vfiomig send` reads: ``synth``
(``synth:SIZE:1``), ``file`` (a file in /dev/shm, in the page cache, written before the
runs), ``pipe`` (``fd:N``, a pipe enlarged to 1 MiB fed by ``cat`` of that file in its own
process), ``vfio-user`` (vfiomig's own vfio-user server with a null device,
``benchmarks.vfio_user.null_device``, a fresh process per run, whose STOP_COPY stream is
SIZE bytes) or ``vfio`` (the fast fake kernel VFIO device: `FakeVfioDevice` with a ``fed``
saving model, its STOP_COPY data fd a UNIX socket a thread feeds with SIZE bytes, in the
sender's process through ``tests.e2e.fakevfio_send``). cref_send always sends its one
repeated block: into the same receiver it is "receive alone". Sender ``read`` (device
sources only) is the source alone: vfiomig's `VfioUserSource` reading the device to its end,
sending nothing (``benchmarks/vfio_user/pyclient.py``), or the fake VFIO device's data fd
read to its end (``benchmarks.fake_vfio_read``); a device case's verdict is ``send`` against
the slower of ``read`` and ``cref``. Senders: ``cref``, ``cref-same`` (cref_send making the
bytes the case's source carries: ``--data synth`` made per packet the way ``synth:`` makes
them, ``--data file:PATH`` pread from the same file, ``--data fd:N`` read in order from a
pipe fed as the ``pipe`` case's is; not for devices: what a plain C sender pays for those
bytes, the yardstick for the work vfiomig cannot skip), ``send`` (native core), ``trio``
(the native core's trio sender, ``VFIOMIG_SEND_THREADS=0``), ``pure``
(``VFIOMIG_PUREPYTHON=1``), ``base`` / ``base-pure`` (another checkout, ``VFIOMIG_BASE=DIR``
as in `benchmarks.compare`), ``send-direct`` / ``send-fed`` (and ``base-direct`` /
``base-fed``: the C path's channel threads forced to make their own packets, or to be fed by
a reader, ``VFIOMIG_SEND_DIRECT=1/0``), ``bench`` (the sender process of ``vfiomig bench``,
`vfiomig.bench._sendproc`, its pattern source; any SOURCE). With ``--receiver cref`` (the C
reference receiver, faster than vfiomig's) a sender's figure is what it sustains, so
``--receiver cref --senders cref,bench`` next to a default run says how far ahead of
vfiomig's receiver bench's sender is.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.compare import Case, _receiver_argv, _wait4
from benchmarks.cref import DEFAULT_IDSTR, DEFAULT_UUID, build, start_sender, wait_ready
from vfiomig._units import parse_size

SENDERS = ("cref", "send")
GOAL_CASES = [
    "1M:4:synth",
    "64K:4:synth",
    "4K:4:synth",
    "1M:1:synth",
    "1M:16:synth",
    "1M:4:file",
    "64K:4:file",
    "4K:4:file",
    "1M:4:pipe",
    "64K:4:pipe",
    "4K:4:pipe",
]
#: Device sources: a case of one also runs sender ``read`` (the source alone).
DEVICES = ("vfio-user", "vfio")
_TMPFS = "/dev/shm" if os.path.isdir("/dev/shm") else None


@dataclass(frozen=True, slots=True)
class SendRun:
    seconds: float  # the receiver's session time
    wall: float  # sender start to receiver exit
    sender_cpu: float
    receiver_cpu: float


def _state_file(directory: str, size: int) -> Path:
    path = Path(directory) / f"vfiomig-send-state-{size}"
    if not path.exists() or path.stat().st_size != size:
        rng = np.random.default_rng(size)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 64 << 20)
                f.write(rng.bytes(n))
                left -= n
    return path


def _sender_env(kind: str) -> tuple[dict[str, str], str | None]:
    env = dict(os.environ)
    env.pop("VFIOMIG_PUREPYTHON", None)
    env.pop("VFIOMIG_REQUIRE_NATIVE", None)
    env.pop("VFIOMIG_SEND_THREADS", None)
    if kind.endswith("pure"):
        env["VFIOMIG_PUREPYTHON"] = "1"
    else:
        env["VFIOMIG_REQUIRE_NATIVE"] = "1"
    if kind == "trio":
        env["VFIOMIG_SEND_THREADS"] = "0"
    env.pop("VFIOMIG_SEND_DIRECT", None)
    if kind.endswith(("-direct", "-fed")):  # channel threads without a reader, or fed by one
        env["VFIOMIG_SEND_DIRECT"] = "1" if kind.endswith("-direct") else "0"
    cwd = os.environ["VFIOMIG_BASE"] if kind.startswith("base") else None
    return env, cwd


def _device_server(tmp: str, size: int) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(Path(tmp) / "device.sock")
    argv = [sys.executable, "-m", "benchmarks.vfio_user.null_device", sock, str(size), "--once"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):  # vfiomig's server links its path once listening
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError("the vfio-user null device did not start")
        time.sleep(0.02)
    return server, sock


def read_alone(case: Case, seed: int) -> SendRun:
    """The device source alone: `VfioUserSource` reads the device's stream to its end, or
    the fake VFIO device's data fd is read to its end."""
    if case.sink == "vfio":
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.fake_vfio_read", str(case.size), str(seed)],
            capture_output=True,
            timeout=300,
            check=True,
        )
        result = json.loads(out.stdout.decode().strip().splitlines()[-1])
        if result["bytes"] != case.size:
            raise RuntimeError(f"read {case}: {result['bytes']} bytes of {case.size}")
        return SendRun(float(result["seconds"]), float(result["seconds"]), result["cpu_s"], 0.0)
    with tempfile.TemporaryDirectory(prefix="vfiomig-send-bench-", dir=_TMPFS) as tmp:
        server, sock = _device_server(tmp, case.size)
        try:
            out = subprocess.run(
                [sys.executable, "benchmarks/vfio_user/pyclient.py", sock, "read", "0", "0", "0"],
                capture_output=True,
                timeout=300,
                check=True,
            )
        finally:
            server.kill()
            server.wait()
            if server.stderr:
                server.stderr.close()
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    if result["bytes"] != case.size:
        raise RuntimeError(f"read {case}: {result['bytes']} bytes of {case.size}")
    seconds = float(result["seconds"])
    return SendRun(seconds, seconds, float(result["cpu_s"]), 0.0)


def run_once(kind: str, receiver: str, case: Case, state: Path, seed: int = 1) -> SendRun:
    """One transfer of ``case`` from sender ``kind`` into a fresh ``receiver``."""
    if kind == "read":
        return read_alone(case, seed)
    renv = dict(os.environ)
    renv.pop("VFIOMIG_PUREPYTHON", None)
    renv["VFIOMIG_REQUIRE_NATIVE"] = "1"
    cat = device = None
    with tempfile.TemporaryDirectory(prefix="vfiomig-send-bench-", dir=_TMPFS) as tmp:
        ready = Path(tmp) / "ready.json"
        argv = _receiver_argv(receiver, "tcp:127.0.0.1:0", case, ready, "null:", [])
        recv = subprocess.Popen(argv, env=renv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        send = None
        try:
            addr = wait_ready(ready, recv, timeout=30)[0]
            t0 = time.perf_counter()
            pipe = None
            if case.sink == "pipe" and kind not in ("cref", "bench"):  # their own bytes
                cat, pipe = _feed_pipe(state)
            if kind.startswith("cref"):
                send = start_sender(
                    addr,
                    channels=case.channels,
                    size=case.size,
                    packet_size=case.packet,
                    seed=seed,
                    data=_cref_data(kind, case, state, pipe),
                    pass_fds=() if pipe is None else (pipe,),
                )
            elif kind == "bench":
                job = {
                    "mode": "send",
                    "connect": [addr],
                    "channels": case.channels,
                    "uuid": DEFAULT_UUID,
                    "devices": [
                        {"idstr": DEFAULT_IDSTR, "instance": 0, "size": case.size, "seed": seed}
                    ],
                    "packet_size": case.packet,
                    "order": "roundrobin",
                    "seed": 0,
                }
                send = subprocess.Popen(
                    [sys.executable, "-m", "vfiomig.bench._sendproc", json.dumps(job)],
                    env=_sender_env("send")[0],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            else:
                env, cwd = _sender_env(kind)
                pass_fds: tuple[int, ...] = ()
                head = ["-m", "vfiomig"]
                if case.sink == "synth":
                    spec = f"synth:{case.size}:{seed}"
                elif case.sink == "file":
                    spec = f"file:{state}"
                elif case.sink == "vfio-user":
                    device, sock = _device_server(tmp, case.size)
                    spec = f"vfio-user:{sock}"
                elif case.sink == "vfio":
                    model = {"stop_copy": case.size, "seed": seed, "fed": True, "keep": False}
                    head = ["-m", "tests.e2e.fakevfio_send", json.dumps(model), f"{tmp}/fake"]
                    spec = "vfio:{device}"
                elif pipe is not None:
                    spec, pass_fds = f"fd:{pipe}", (pipe,)
                send = subprocess.Popen(
                    [
                        sys.executable,
                        *head,
                        "send",
                        "--connect",
                        addr,
                        "--channels",
                        str(case.channels),
                        "--uuid",
                        DEFAULT_UUID,
                        "--device",
                        f"{DEFAULT_IDSTR}/0={spec}",
                        "--packet-size",
                        str(case.packet),
                        "--json",
                    ],
                    env=env,
                    cwd=cwd,
                    pass_fds=pass_fds,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            if pipe is not None:
                os.close(pipe)  # the sender's now
            assert recv.stdout is not None
            rout = recv.stdout.read()
            _, rusage = _wait4(recv)
            wall = time.perf_counter() - t0
            sout, serr, sender_total = _reap(send)
            if recv.returncode != 0 or send.returncode != 0:
                err = recv.stderr.read().decode(errors="replace") if recv.stderr else ""
                raise RuntimeError(
                    f"{kind} {case}: receiver {recv.returncode} sender {send.returncode}:"
                    f" {err[-2000:]} {serr.decode()[-1000:]}"
                )
            rsum = json.loads(rout.decode().strip().splitlines()[-1])
            ssum = json.loads(sout.decode().strip().splitlines()[-1])
            if receiver == "cref":  # its own summary: bytes and seconds of the transfer
                rsum = {"bytes": rsum["bytes"], "seconds": rsum["seconds"]}
            got = rsum.get("bytes", sum(d["bytes"] for d in rsum.get("devices", [])))
            if got != case.size:
                raise RuntimeError(f"{kind} {case}: the receiver got {got} bytes of {case.size}")
            return SendRun(
                seconds=float(rsum["seconds"]),
                wall=wall,
                # A sender without the figure (an older checkout): its whole process.
                sender_cpu=float(ssum.get("cpu_seconds", sender_total)),
                receiver_cpu=rusage.ru_utime + rusage.ru_stime,
            )
        finally:
            for proc in (recv, send, cat, device):
                if proc is not None:
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait()
                    for stream in (proc.stdout, proc.stderr):
                        if stream:
                            stream.close()


def _feed_pipe(state: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A pipe enlarged to 1 MiB that ``cat`` of ``state`` fills, in its own process:
    (``cat``, the read end, for the sender to inherit)."""
    rfd, wfd = os.pipe()
    fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 1 << 20)
    cat = subprocess.Popen(["cat", str(state)], stdout=wfd)
    os.close(wfd)
    return cat, rfd


def _cref_data(kind: str, case: Case, state: Path, pipe: int | None) -> str:
    """cref_send's ``--data``: ``cref`` sends its one hot block; ``cref-same`` gets the
    bytes as the case's source has them (``synth``: made per packet the way `synth:` is;
    ``file``: pread from the same file; ``pipe``: read in order from the same kind of
    pipe, fed the same way), a plain C sender's cost for those bytes."""
    if kind == "cref":
        return "hot"
    if case.sink == "synth":
        return "synth"
    if case.sink == "file":
        return f"file:{state}"
    if case.sink == "pipe" and pipe is not None:
        return f"fd:{pipe}"
    raise ValueError(f"cref-same has no {case.sink} source (synth, file and pipe only)")


def _reap(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes, float]:
    """A finished sender's stdout, stderr and whole CPU time (reaped with its rusage)."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()  # its stderr is a few lines at most
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return out, err, rusage.ru_utime + rusage.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--case", action="append", help="PACKET:CHANNELS:SOURCE (repeatable)")
    ap.add_argument("--size", type=parse_size, default=None, help="state bytes per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--senders", default=",".join(SENDERS))
    ap.add_argument("--receiver", default="native", choices=("native", "cref"))
    args = ap.parse_args(argv)
    senders = tuple(args.senders.split(","))
    cases = [Case.parse(c, args.size) for c in (args.case or GOAL_CASES)]
    build()
    print(f"# load average before: {Path('/proc/loadavg').read_text().strip()}")
    rows: dict[Case, dict[str, list[SendRun]]] = {}
    with tempfile.TemporaryDirectory(prefix="vfiomig-send-state-", dir=_TMPFS) as states:
        for case in cases:
            state = Path(os.devnull)
            if case.sink in ("file", "pipe"):  # kept for the cases of its size, then removed
                state = _state_file(states, case.size)
            extra = ("read",) if case.sink in DEVICES and "read" not in senders else ()
            kinds = senders + extra
            if case.sink in DEVICES:  # no plain C sender of a device
                kinds = tuple(k for k in kinds if k != "cref-same")
            runs: dict[str, list[SendRun]] = {k: [] for k in kinds}
            for i in range(args.repeat):
                for kind in kinds:
                    runs[kind].append(run_once(kind, args.receiver, case, state, seed=1 + i))
            rows[case] = runs
            _print_case(case, runs, kinds)
    print(f"# load average after: {Path('/proc/loadavg').read_text().strip()}")
    print(
        json.dumps(
            {
                str(c).replace(" -> ", " from "): {
                    k: {
                        "seconds": float(np.median([r.seconds for r in v])),
                        "sender_cpu": float(np.median([r.sender_cpu for r in v])),
                    }
                    for k, v in runs.items()
                }
                for c, runs in rows.items()
            }
        )
    )
    return 0


def _print_case(case: Case, runs: dict[str, list[SendRun]], senders: tuple[str, ...]) -> None:
    gib = case.size / (1 << 30)
    med = {k: float(np.median([r.seconds for r in v])) for k, v in runs.items()}
    wall = {k: float(np.median([r.wall for r in v])) for k, v in runs.items()}
    cpu = {k: float(np.median([r.sender_cpu for r in v])) / gib for k, v in runs.items()}
    rcpu = {k: float(np.median([r.receiver_cpu for r in v])) / gib for k, v in runs.items()}
    name = f"{case.packet >> 10}KiB x {case.channels}ch from {case.sink}"
    parts = []
    for k in senders:
        part = f"{k} {case.size / med[k] / 1e9:.2f} GB/s (wall {wall[k]:.2f} s)"
        part += f" cpu {cpu[k]:.2f}/{rcpu[k]:.2f} s/GiB"
        if "cref" in senders and k not in ("cref", "read"):
            part += f" = {med['cref'] / med[k]:.2f}x cref, cpu {cpu[k] / cpu['cref']:.2f}x"
        if "cref-same" in runs and k not in ("cref", "cref-same", "read"):
            same = "cref-same"
            part += f" = {med[same] / med[k]:.2f}x cref-same, cpu {cpu[k] / cpu[same]:.2f}x"
        parts.append(part)
    print(f"{name:<24} " + " | ".join(parts), flush=True)
    if "read" in runs and "send" in runs and "cref" in runs:
        slower = max(med["read"], med["cref"])
        print(
            f"{'':<24} send at {slower / med['send']:.2f} x the slower of (read alone, receive alone)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
