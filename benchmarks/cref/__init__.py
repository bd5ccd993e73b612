"""Run the C reference (cref_recv, cref_send, cref_drain) from Python.

The C reference is the physical-limit baseline of every speed comparison (issue 3, part 2):
the same job as ``vfiomig receive`` done as simply and fast as C allows.  This module builds
the binaries on demand with ``make`` into ``benchmarks/cref/build/`` (ignored by git), runs a
receiver and a sender as subprocesses, and returns both JSON summaries.  It also computes the
sender's data pattern in Python, so that a receiver's output can be checked by sha256.

Only the standard library and numpy are used.

Example::

    from benchmarks.cref import run_transfer
    result = run_transfer(channels=4, size=1 << 30, packet_size=1 << 20, output="null")
    print(result.receiver["gbps"])
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "BUILD_DIR",
    "CREF_DIR",
    "DEFAULT_IDSTR",
    "DEFAULT_UUID",
    "Transfer",
    "base_block",
    "build",
    "config_blob",
    "expected_sha256",
    "expected_stream",
    "run_transfer",
    "start_sender",
    "wait_ready",
]

CREF_DIR = Path(__file__).resolve().parent
# CREF_BUILD_DIR (with CFLAGS/LDFLAGS in the environment, which make honours) selects
# another build, e.g. a sanitizer one: CFLAGS="-O1 -g -fsanitize=address,undefined".
BUILD_DIR = Path(os.environ.get("CREF_BUILD_DIR") or CREF_DIR / "build")
DEFAULT_UUID = "0123456789abcdef0123456789abcdef"
DEFAULT_IDSTR = "0000:00:04.0/vfio"
_BINARIES = ("cref_recv", "cref_send", "cref_drain")
_DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
_END_OF_STATE = 0xFFFFFFFFEF100001
_GAMMA = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def build(*, quiet: bool = True) -> dict[str, Path]:
    """Build the C reference if a source changed; return ``{name: path}`` of the binaries."""
    subprocess.run(
        ["make", "-s", "-C", str(CREF_DIR), f"BUILD={BUILD_DIR}"],
        check=True,
        stdout=subprocess.DEVNULL if quiet else None,
    )
    return {name: BUILD_DIR / name for name in _BINARIES}


def base_block(packet_size: int, seed: int) -> bytes:
    """The block every packet's data is cut from: ``cref_fill_base()`` in cref_common.h.

    splitmix64 seeded with ``seed``, each output word stored little-endian.
    """
    words = (packet_size + 7) // 8
    with np.errstate(over="ignore"):
        k = np.arange(1, words + 1, dtype=np.uint64)
        z = np.uint64(seed & _M64) + k * np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.astype("<u8").tobytes()[:packet_size]


def expected_stream(
    size: int, packet_size: int, *, seed: int = 1, device: int = 0
) -> Iterator[bytes]:
    """Yield, packet by packet in idx order, the data bytes device ``device`` must receive."""
    base = base_block(packet_size, seed)
    for idx, off in enumerate(range(0, size, packet_size)):
        n = min(packet_size, size - off)
        tag = ((device << 32) | idx).to_bytes(8, "big")
        yield tag[:n] + base[8:n]


def expected_sha256(size: int, packet_size: int, *, seed: int = 1, device: int = 0) -> str:
    """sha256 hex digest of :func:`expected_stream`."""
    h = hashlib.sha256()
    for chunk in expected_stream(size, packet_size, seed=seed, device=device):
        h.update(chunk)
    return h.hexdigest()


def config_blob(size: int, packet_size: int, *, device: int = 0) -> bytes:
    """The config blob cref_send sends for ``device`` (config packet idx = packet count)."""
    npackets = -(-size // packet_size)
    return (
        _DEV_CONFIG_STATE.to_bytes(8, "big")
        + device.to_bytes(4, "big")
        + npackets.to_bytes(4, "big")
        + _END_OF_STATE.to_bytes(8, "big")
    )


def wait_ready(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> list[str]:
    """Wait for a ``--ready-file`` and return its data addresses."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)
    addrs: list[str] = json.loads(path.read_text())["data"]
    return addrs


def start_sender(
    address: str,
    *,
    channels: int,
    size: int,
    packet_size: int,
    uuid: str = DEFAULT_UUID,
    order: str = "roundrobin",
    seed: int = 1,
    rate: int = 0,
    devices: int = 1,
    idstr: str = DEFAULT_IDSTR,
    instance: int = 0,
    data: str = "hot",
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start cref_send against ``address`` (any receiver: cref_recv or vfiomig);
    ``data``: ``hot`` (one block), ``synth``, ``file:PATH`` or ``fd:N`` (a descriptor
    in ``pass_fds``; see cref_send.c)."""
    binary = build()["cref_send"]
    argv = [str(binary), address, str(channels), uuid, "--size", str(size)]
    argv += ["--packet-size", str(packet_size), "--order", order, "--seed", str(seed)]
    argv += ["--rate", str(rate), "--devices", str(devices), "--idstr", idstr]
    argv += ["--instance", str(instance), "--data", data]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)


@dataclasses.dataclass
class Transfer:
    """Both summaries of one run, plus the drainer's when the output was a pipe."""

    receiver: dict[str, object]
    sender: dict[str, object]
    drainer: dict[str, object] | None = None


def _finish(proc: subprocess.Popen[bytes], name: str, timeout: float) -> dict[str, object]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{name} timed out: {err.decode(errors='replace')}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}: {err.decode(errors='replace')}")
    summary: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return summary


def run_transfer(
    *,
    channels: int = 4,
    size: int = 1 << 30,
    packet_size: int = 1 << 20,
    output: str = "null",
    listen: str = "tcp:127.0.0.1:0",
    order: str = "roundrobin",
    seed: int = 1,
    rate: int = 0,
    devices: int = 1,
    config: str | os.PathLike[str] | None = None,
    mode: str = "epoll",
    pipe_size: int = 1 << 20,
    drainer: Sequence[str] | None = None,
    uuid: str = DEFAULT_UUID,
    timeout: float = 300.0,
) -> Transfer:
    """Run cref_send -> cref_recv once and return both JSON summaries.

    ``output`` is passed to cref_recv (a path, ``"null"``, ``"fd:N"``), or ``"pipe"``: a pipe
    enlarged to ``pipe_size`` with F_SETPIPE_SZ whose read end goes to ``drainer`` (default
    cref_drain; e.g. ``["cat"]`` with its stdout on /dev/null).
    """
    bins = build()
    procs: list[subprocess.Popen[bytes]] = []
    read_fd = write_fd = -1
    drain_proc = None
    with tempfile.TemporaryDirectory(prefix="cref-") as tmp:
        ready = Path(tmp) / "ready.json"
        try:
            pass_fds: tuple[int, ...] = ()
            if output == "pipe":
                read_fd, write_fd = os.pipe()
                fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, pipe_size)
                with open(os.devnull, "wb") as devnull:
                    drain_proc = subprocess.Popen(
                        list(drainer) if drainer else [str(bins["cref_drain"])],
                        stdin=read_fd,
                        stdout=subprocess.PIPE if not drainer else devnull,
                    )
                procs.append(drain_proc)
                os.close(read_fd)
                read_fd = -1
                output = f"fd:{write_fd}"
                pass_fds = (write_fd,)
            argv = [str(bins["cref_recv"]), listen, str(channels), uuid, output]
            argv += ["--ready-file", str(ready)]
            if config is not None:
                argv += ["--config", os.fspath(config)]
            if mode != "epoll":  # "threads" or "writer-thread"
                argv.append(f"--{mode}")
            recv = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds
            )
            procs.append(recv)
            if write_fd >= 0:
                # Only the receiver may hold the write end, or the drainer never sees EOF.
                os.close(write_fd)
                write_fd = -1
            address = wait_ready(ready, recv)[0]
            send = start_sender(
                address,
                channels=channels,
                size=size,
                packet_size=packet_size,
                uuid=uuid,
                order=order,
                seed=seed,
                rate=rate,
                devices=devices,
            )
            procs.append(send)
            sender = _finish(send, "cref_send", timeout)
            receiver = _finish(recv, "cref_recv", timeout)
            drained = None
            if drain_proc is not None:
                if drainer:
                    drain_proc.wait(timeout)
                else:
                    drained = _finish(drain_proc, "cref_drain", timeout)
            return Transfer(receiver=receiver, sender=sender, drainer=drained)
        finally:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
