"""vfiomig's Python vfio-user server against libvfio-user's C server, on the same client.

    .venv/bin/python -m benchmarks.vfio_user_server [--reads N] [--dma K] [--rounds R]
        [--baseline CHECKOUT]

Both servers expose the same device: BAR0 of 4 KiB answers reads, and a write of a u32
K to it makes the server do K DMA reads of 4 KiB from the client's first DMA region
(DMA_READ messages, the client answers with the data). The C server is
``benchmarks/vfio_user/bench_server.c`` on libvfio-user (built with
``../shared/tools/build-libvfio-user`` via tests/libvfio_user.py); the Python server is
this module with ``--serve``. The client is one blocking Python socket loop, the same
for both, so its cost is in both figures (the ratio understates the servers' gap).

Measured per operation: a 4-byte REGION_READ round trip, and one 4 KiB DMA_READ (from
the server's request to the client's reply arriving and being consumed by the server,
timed at the client over K of them). Reported as microseconds and Python / C ratio,
the best of R rounds; beside each, the server process's CPU time per operation
(user + system, from /proc/PID/stat over the same runs): on a loaded machine the wall
time is mostly waiting for a CPU, and a server that spends more CPU per operation waits
longer, so the CPU figure says what the server itself costs. The load average is printed
with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vfiomig.transport import unix_socket_listening

HEADER = struct.Struct("=HHIII")
ACCESS = struct.Struct("=QII")
DMA_ACCESS = struct.Struct("=QQ")
IOVA = 0x100000
HERE = Path(__file__).resolve().parent


class Client:
    """A blocking vfio-user client that answers the server's DMA_READs from a buffer."""

    def __init__(self, path: str) -> None:
        for _ in range(100):  # the socket file exists a moment before it listens
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                self.sock.close()
                time.sleep(0.02)
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.guest = bytes(range(256)) * 16
        caps = b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}\0'
        self.call(1, struct.pack("=HH", 0, 2) + caps)
        self.call(2, struct.pack("=IIQQQ", 32, 3, 0, IOVA, 4096))  # DMA_MAP, no fd

    def _recv_exact(self, n: int) -> memoryview:
        got = 0
        while got < n:
            k = self.sock.recv_into(self.view[got:n])
            if not k:
                raise EOFError("server closed the connection")
            got += k
        return self.view[:n]

    def receive(self) -> tuple[int, int, int, int, bytes]:
        msg_id, command, size, flags, error = HEADER.unpack(self._recv_exact(16))
        body = bytes(self._recv_exact(size - 16)) if size > 16 else b""
        return msg_id, command, flags, error, body

    def call(self, command: int, payload: bytes) -> bytes:
        self.sock.sendall(HEADER.pack(7, command, 16 + len(payload), 0, 0) + payload)
        _, got, flags, error, body = self.receive()
        if flags & 0x20 or got != command:
            raise OSError(error, f"command {command} failed")
        return body

    def region_reads(self, n: int) -> float:
        request = HEADER.pack(9, 9, 16 + ACCESS.size, 0, 0) + ACCESS.pack(0, 0, 4)
        start = time.perf_counter()
        for _ in range(n):
            self.sock.sendall(request)
            self._recv_exact(16 + ACCESS.size + 4)
        return (time.perf_counter() - start) / n

    def dma_reads(self, k: int) -> float:
        write = (
            HEADER.pack(10, 10, 16 + ACCESS.size + 4, 0, 0)
            + ACCESS.pack(0, 0, 4)
            + struct.pack("=I", k)
        )
        start = time.perf_counter()
        self.sock.sendall(write)
        answered, replied = 0, False
        while answered < k or not replied:
            msg_id, command, size, flags, error = HEADER.unpack(self._recv_exact(16))
            body = self._recv_exact(size - 16)
            if command == 11 and not flags & 1:  # the server's DMA_READ
                addr, count = DMA_ACCESS.unpack(body)
                offset = addr - IOVA
                reply = HEADER.pack(msg_id, 11, 16 + 16 + count, 1, 0) + DMA_ACCESS.pack(
                    addr, count
                )
                self.sock.sendall(reply + self.guest[offset : offset + count])
                answered += 1
            elif command == 10:
                if flags & 0x20:
                    raise OSError(error, "the DMA trigger write failed")
                replied = True
        return (time.perf_counter() - start) / k


def build_c_server(work: Path) -> tuple[Path, dict[str, str]]:
    sys.path.insert(0, str(HERE.parent))
    from tests.libvfio_user import build

    lvu = build()
    exe = work / "bench_server"
    subprocess.run(
        ["gcc", "-O2", "-o", str(exe), str(HERE / "vfio_user" / "bench_server.c"),
         f"-I{lvu.source / 'include'}", f"-L{lvu.libdir}", "-lvfio-user"],
        check=True,
    )  # fmt: skip
    return exe, lvu.env()


def start(
    cmd: list[str],
    path: Path,
    env: dict[str, str] | None = None,
    *,
    lvu: bool = False,
    cwd: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server and wait until it listens: libvfio-user (``lvu``) binds, then
    listens (the socket table tells); vfiomig's server links its path once listening."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stderr=subprocess.DEVNULL)
    ready = unix_socket_listening if lvu else os.path.exists
    for _ in range(400):
        if ready(str(path)):
            return proc
        time.sleep(0.025)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not listen on {path}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


KEYS = ("region_read_us", "dma_read_us", "region_read_cpu_us", "dma_read_cpu_us")


def measure(
    clients: dict[str, Client], pids: dict[str, int], reads: int, dma: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Best of ``rounds`` per server; the servers take turns within each round, so that
    both see the same machine load (the ratio is the figure to trust on a busy host).
    CPU per operation is over all rounds (clock ticks are too coarse for one)."""
    best = {name: {key: float("inf") for key in KEYS[:2]} for name in clients}
    cpu = {name: [0.0, 0.0] for name in clients}
    for client in clients.values():  # warm up
        client.region_reads(min(reads, 1000))
        client.dma_reads(min(dma, 200))
    for _ in range(rounds):
        for name, client in clients.items():
            start = cpu_seconds(pids[name])
            wall = client.region_reads(reads)
            middle = cpu_seconds(pids[name])
            best[name]["region_read_us"] = min(best[name]["region_read_us"], wall * 1e6)
            wall = client.dma_reads(dma)
            cpu[name][0] += middle - start
            cpu[name][1] += cpu_seconds(pids[name]) - middle
            best[name]["dma_read_us"] = min(best[name]["dma_read_us"], wall * 1e6)
    for name in clients:
        best[name]["region_read_cpu_us"] = cpu[name][0] / (reads * rounds) * 1e6
        best[name]["dma_read_cpu_us"] = cpu[name][1] / (dma * rounds) * 1e6
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--dma", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", metavar="SOCK", help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline",
        metavar="CHECKOUT",
        help="also run the Python server of another checkout (e.g. main's worktree), same run",
    )
    args = parser.parse_args()
    if args.serve:
        import trio

        trio.run(serve_python, args.serve)
        return
    with tempfile.TemporaryDirectory(prefix="vub", dir="/tmp") as tmp:
        work = Path(tmp)
        exe, env = build_c_server(work)
        python = [sys.executable, "-m", "benchmarks.vfio_user_server", "--serve"]
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            procs["c"] = start([str(exe), str(work / "c.sock")], work / "c.sock", env, lvu=True)
            procs["python"] = start([*python, str(work / "python.sock")], work / "python.sock")
            if args.baseline:
                tree = os.path.abspath(args.baseline)
                procs["baseline"] = start(
                    [*python, str(work / "baseline.sock")],
                    work / "baseline.sock",
                    {**os.environ, "PYTHONPATH": tree},
                    cwd=tree,
                )
            clients = {name: Client(str(work / f"{name}.sock")) for name in procs}
            pids = {name: proc.pid for name, proc in procs.items()}
            results = measure(clients, pids, args.reads, args.dma, args.rounds)
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()
    ratios = {
        name: {key: results[name][key] / max(results["c"][key], 1e-9) for key in KEYS}
        for name in results
        if name != "c"
    }
    load = Path("/proc/loadavg").read_text().split()[:3]
    if args.json:
        print(json.dumps({"results": results, "over_c": ratios, "loadavg": load}))
        return
    print(f"load average {' '.join(load)}")
    names = [name for name in results if name != "c"]
    print(f"{'operation':<30}{'C (us)':>9}" + "".join(f"{n + ' (us)':>16}{'/C':>7}" for n in names))
    for key, label in (
        ("region_read_us", "REGION_READ 4 B round trip"),
        ("dma_read_us", "DMA_READ 4 KiB"),
        ("region_read_cpu_us", "REGION_READ server CPU"),
        ("dma_read_cpu_us", "DMA_READ server CPU"),
    ):
        row = "".join(f"{results[n][key]:>16.1f}{ratios[n][key]:>7.2f}" for n in names)
        print(f"{label:<30}{results['c'][key]:>9.1f}{row}")


async def serve_python(path: str) -> None:
    import trio

    from vfiomig.vfio_user import PciConfig, Region, VfioUserDevice, serve_vfio_user

    async with trio.open_nursery() as nursery:

        async def dma_reads(k: int) -> None:
            (region,) = device.dma.regions
            sgs = device.dma.translate(region.iova, 4096)
            try:
                for _ in range(k):
                    await device.dma.read(sgs)
            except OSError:
                pass  # the client went away

        def bar0_write(offset: int, data: memoryview) -> None:
            nursery.start_soon(dma_reads, int.from_bytes(data[:4], "little"))

        device = VfioUserDevice(
            pci=PciConfig(0x4E58, 0x0001),
            regions={0: Region(4096, read=lambda offset, count: b"\x5a" * count, write=bar0_write)},
        )
        await serve_vfio_user(path, device)


if __name__ == "__main__":
    os.chdir(HERE.parent)
    main()
