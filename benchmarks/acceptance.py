"""The reassembly issue's acceptance runs, on real processes.

1. ``--case identical``: a sender written from SPEC.md alone (tests/e2e/specsender.py,
   struct and sockets) moves 2 devices of 512 MiB over 8 channels in random order into
   ``vfiomig receive``; the output files and config blobs must be byte-identical.
2. ``--case rss``: ``vfiomig receive --max-queued 64MiB`` receives a 2 GiB state whose
   idx 0 arrives last (``vfiomig send --order idx0-last``); its peak RSS must stay below
   64 MiB + channels x packet size + 100 MiB, and it must complete.

    .venv/bin/python -m benchmarks.acceptance --case identical
    .venv/bin/python -m benchmarks.acceptance --case rss
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.e2e.specsender import config_blob, connect, handshake, packet

UUID = "3f1c2b4a-5d6e-4f70-8192-a3b4c5d6e7f8"
MiB = 1024 * 1024


def start_receiver(tmp: Path, args: list[str]) -> tuple[subprocess.Popen[str], dict[str, object]]:
    ready = tmp / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfiomig", "receive", "--ready-file", str(ready), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(
                f"receiver failed to start: {proc.stderr.read() if proc.stderr else ''}"
            )
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())


def wait_rusage(proc: subprocess.Popen[str]) -> tuple[int, float, str, str]:
    """Wait for ``proc``; return exit status, its own peak RSS in MiB, stdout, stderr."""
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, out, err


def chunk(device: int, idx: int, size: int) -> bytes:
    return random.Random(device * 1_000_003 + idx).randbytes(size)


def case_identical(tmp: Path, size: int, channels: int, packet_size: int) -> bool:
    devices = ["0000:00:04.0/vfio", "0000:00:05.0/vfio"]
    args = ["--listen", "tcp:127.0.0.1:0", "--channels", str(channels), "--uuid", UUID]
    args += ["--config-out", str(tmp), "--json"]
    for dev in devices:
        args += ["--device", f"{dev}=file:{tmp / (dev.replace('/', '_') + '.out')}"]
    proc, ready = start_receiver(tmp, args)
    npk = size // packet_size
    configs = [config_blob(random.Random(d).randbytes(700)) for d in range(len(devices))]
    rng = random.Random(42)
    # Random channel for every packet; each channel carries its packets in queue order.
    plan: list[list[tuple[int, int]]] = [[] for _ in range(channels)]
    for i in range(npk + 1):
        for d in range(len(devices)):
            plan[rng.randrange(channels)].append((d, i))
    expected = []
    for d in range(len(devices)):
        h = hashlib.sha256()
        for i in range(npk):
            h.update(chunk(d, i, packet_size))
        expected.append(h.hexdigest())
    addr = str(ready["data"][0])  # type: ignore[index]
    socks = [connect(addr) for _ in range(channels)]
    t0 = time.perf_counter()

    def pump(c: int) -> None:
        s = socks[c]
        s.sendall(handshake(bytes.fromhex(UUID.replace("-", "")), c))
        for d, i in plan[c]:
            if i < npk:
                s.sendall(packet(devices[d], 0, i, 0, chunk(d, i, packet_size)))
            else:
                s.sendall(packet(devices[d], 0, i, 1, configs[d]))
        s.close()

    threads = [threading.Thread(target=pump, args=(c,)) for c in range(channels)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    code, rss, _out, err = wait_rusage(proc)
    seconds = time.perf_counter() - t0
    ok = code == 0
    for d, name in enumerate(devices):
        data = tmp / (name.replace("/", "_") + ".out")
        got = hashlib.sha256(data.read_bytes()).hexdigest()
        cfg = (tmp / f"{name.replace('/', '_')}.0.config").read_bytes()
        same = got == expected[d] and cfg == configs[d]
        ok = ok and same
        print(
            f"  {name}: sha256 {'identical' if got == expected[d] else 'DIFFERENT'},"
            f" config {'identical' if cfg == configs[d] else 'DIFFERENT'}"
        )
        data.unlink()
    print(
        f"identical: exit {code}, {2 * size / MiB:.0f} MiB in {seconds:.1f} s, peak RSS {rss:.0f} MiB"
    )
    if err.strip():
        print(err.strip())
    return ok


def case_rss(tmp: Path, size: int, channels: int, packet_size: int, budget: int) -> bool:
    args = ["--listen", "tcp:127.0.0.1:0", "--channels", str(channels), "--uuid", UUID]
    args += ["--config-out", str(tmp), "--json", "--max-queued", str(budget)]
    args += ["--device", "0000:00:04.0/vfio=null:"]
    proc, ready = start_receiver(tmp, args)
    t0 = time.perf_counter()
    send = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfiomig",
            "send",
            "--connect",
            str(ready["data"][0]),  # type: ignore[index]
            "--channels",
            str(channels),
            "--uuid",
            UUID,
            "--device",
            f"0000:00:04.0/vfio=synth:{size}:5",
            "--packet-size",
            str(packet_size),
            "--order",
            "idx0-last",
        ],
        capture_output=True,
        text=True,
    )
    code, rss, out, err = wait_rusage(proc)
    seconds = time.perf_counter() - t0
    limit = (budget + channels * packet_size) / MiB + 100
    summary = json.loads(out) if out.strip() else {}
    peak_q = summary.get("peak_queued_bytes", 0) / MiB
    print(
        f"rss: exit {code} (send {send.returncode}), {size / MiB:.0f} MiB in {seconds:.1f} s,"
        f" peak queued {peak_q:.1f} MiB, peak RSS {rss:.0f} MiB (limit {limit:.0f} MiB)"
    )
    if err.strip():
        print(err.strip())
    return code == 0 and send.returncode == 0 and rss < limit


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--case", choices=("identical", "rss"), required=True)
    p.add_argument("--size-mib", type=int, help="per device (identical: 512) or total (rss: 2048)")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--packet-size", type=int, default=MiB)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        if a.case == "identical":
            ok = case_identical(Path(d), (a.size_mib or 512) * MiB, a.channels, a.packet_size)
        else:
            ok = case_rss(Path(d), (a.size_mib or 2048) * MiB, a.channels, a.packet_size, 64 * MiB)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
