"""Where ``vfiomig send``'s CPU goes, steady state: perf attached to the sender mid-run.

Usage::

    .venv/bin/python -m benchmarks.profile_send 1M:4:synth [--seconds 3] [--size 8G] [--cref]

The receiver is ``vfiomig receive`` (native core, null sink), as in
`benchmarks.compare_send`; the sender (``vfiomig send``, or ``cref_send`` with ``--cref``)
sends ``--size`` bytes, and ``perf record -g`` samples it for ``--seconds`` from the moment
the sender has connected its channels, plus 0.3 s (start-up left out). Samples are grouped
by where they land: the kernel's copy into socket buffers (``_copy_from_iter``), the rest of
the kernel's send path, other kernel work (epoll, page faults, softirq), reading the source
(numpy's XOR for ``synth``, the read copy for ``file``/``pipe``; a ``pipe`` is fed by
``cat`` of a file of at most 1 GiB, as often as ``--size`` needs, into a pipe of 1 MiB as in
`benchmarks.compare_send`), sendfile's and splice's taking of the source's pages (the
zero-copy sends, vfiomig_sendzc.c), the C core, the interpreter (trio's scheduling and
vfiomig's Python), and the rest (libc, ...). perf must be on PATH.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.compare import Case, _receiver_argv
from benchmarks.cref import DEFAULT_IDSTR, DEFAULT_UUID, start_sender, wait_ready
from vfiomig._units import parse_size

GROUPS = (
    ("kernel: copy into the socket", lambda dso, sym, stack: sym == "_copy_from_iter"),
    (
        "kernel: reading the source",
        lambda dso, sym, stack: "ksys_read" in stack or "readv" in stack,
    ),
    (
        # sendfile's and splice's other half (vfiomig_sendzc.c): page references taken
        # from the page cache or a pipe, no copy
        "kernel: sendfile/splice taking the source's pages",
        lambda dso, sym, stack: (
            "kernel" in dso
            and "sendmsg" not in stack
            and ("splice" in stack or "sendfile" in stack)
        ),
    ),
    ("kernel: rest of sendmsg", lambda dso, sym, stack: "sendmsg" in stack and "kernel" in dso),
    ("kernel: other (epoll, faults, irq)", lambda dso, sym, stack: "kernel" in dso),
    ("numpy (synth state)", lambda dso, sym, stack: "multiarray" in dso),
    ("C core (_native)", lambda dso, sym, stack: "_native" in dso),
    ("interpreter (trio, vfiomig)", lambda dso, sym, stack: "libpython" in dso),
    ("libc and the rest", lambda dso, sym, stack: True),
)


def _samples(data: Path) -> collections.Counter[str]:
    """perf script's samples grouped by `GROUPS` (leaf frame's dso and symbol, callers)."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym,dso"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts: collections.Counter[str] = collections.Counter()
    for block in out.split("\n\n"):
        frames = [line.split(None, 1)[-1] for line in block.strip().splitlines()]
        if not frames:
            continue
        leaf = frames[0]
        sym = leaf.split(" (")[0].split("+")[0].strip()
        dso = leaf.rsplit("(", 1)[-1]
        stack = " ".join(frames)
        for name, match in GROUPS:
            if match(dso, sym, stack):
                counts[name] += 1
                counts[f"{name}\0{sym}"] += 1  # each group's leaf symbols, for --top
                break
    return counts


def profile(case: Case, seconds: float, cref: bool) -> collections.Counter[str]:
    env = dict(os.environ, VFIOMIG_REQUIRE_NATIVE="1")
    env.pop("VFIOMIG_PUREPYTHON", None)
    with tempfile.TemporaryDirectory(prefix="vfiomig-prof-", dir="/dev/shm") as tmp:
        ready = Path(tmp) / "ready.json"
        argv = _receiver_argv("native", "tcp:127.0.0.1:0", case, ready, "null:", [])
        recv = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        send = feeder = None
        try:
            addr = wait_ready(ready, recv, timeout=30)[0]
            if cref:
                send = start_sender(
                    addr, channels=case.channels, size=case.size, packet_size=case.packet
                )
            else:
                pass_fds: tuple[int, ...] = ()
                spec = f"synth:{case.size}:1"
                if case.sink == "file":
                    spec = f"file:{_state(Path(tmp), case.size)}"  # removed with tmp
                elif case.sink == "pipe":  # as compare_send's: cat of a file, a 1 MiB pipe
                    rfd, wfd = os.pipe()
                    fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 1 << 20)
                    part = _state(Path(tmp), min(case.size, 1 << 30))
                    copies = -(-case.size // (1 << 30))
                    feeder = subprocess.Popen(["cat"] + [str(part)] * copies, stdout=wfd)
                    os.close(wfd)
                    spec, pass_fds = f"fd:{rfd}", (rfd,)
                send = subprocess.Popen(
                    [sys.executable, "-m", "vfiomig", "send", "--connect", addr,
                     "--channels", str(case.channels), "--uuid", DEFAULT_UUID,
                     "--device", f"{DEFAULT_IDSTR}/0={spec}", "--packet-size", str(case.packet)],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    pass_fds=pass_fds,
                )  # fmt: skip
                if pass_fds:
                    os.close(pass_fds[0])
            _wait_started(send.pid, case.channels)
            data = Path(tmp) / "perf.data"
            subprocess.run(
                ["perf", "record", "-q", "-g", "-F", "2000", "-o", str(data),
                 "-p", str(send.pid), "--", "sleep", str(seconds)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            return _samples(data)
        finally:
            for proc in (send, recv, feeder):
                if proc is not None:
                    proc.kill()
                    proc.wait()
            if recv.stderr:
                recv.stderr.close()


def _state(directory: Path, size: int) -> Path:
    path = directory / "state"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size)
            f.seek(0)
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
    return path


def _wait_started(pid: int, channels: int, timeout: float = 30.0) -> None:
    """Until the sender holds its channels' sockets (its start-up is over), then 0.3 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fds = Path(f"/proc/{pid}/fd")
        sockets = 0
        for fd in fds.iterdir():
            try:
                sockets += os.readlink(fd).startswith("socket:")
            except OSError:
                pass
        if sockets >= channels:
            time.sleep(0.3)
            return
        time.sleep(0.01)
    raise TimeoutError("the sender did not connect")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", help="PACKET:CHANNELS:SOURCE, SOURCE synth, file or pipe")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", default="8G")
    ap.add_argument("--cref", action="store_true", help="profile cref_send instead")
    ap.add_argument("--top", type=int, default=0, help="each group's N leaf symbols too")
    args = ap.parse_args()
    case = Case.parse(args.case, parse_size(args.size))
    counts = profile(case, args.seconds, args.cref)
    total = sum(n for k, n in counts.items() if "\0" not in k)
    who = "cref_send" if args.cref else "vfiomig send"
    print(f"# {who}, {case} ({total} samples at 2 kHz over {args.seconds} s)")
    for name, _ in GROUPS:
        print(f"{100 * counts[name] / total:6.1f}%  {name}")
        syms = [(k.split("\0")[1], n) for k, n in counts.most_common() if k.startswith(name + "\0")]
        for sym, n in syms[: args.top]:
            print(f"{'':8}{100 * n / total:5.1f}%  {sym}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
