"""The ``vfio-user`` and ``vfio-user-lvu`` bench sinks: a vfio-user device server per
device, in its own process, loaded through `VfioUserSink`.

``vfio-user``: vfiomig's own server (`serve_vfio_user`) with `NullEmulator`, a device
whose stream has no fixed size (`main`); the sink
writes 1 MiB messages (the server reads whole messages). ``vfio-user-lvu``: the same
device on libvfio-user (``benchmarks/vfio_user/vu_server.c``), found at
``$VFIOMIG_LVU_SERVER`` or in ``benchmarks/vfio_user/build/`` of the checkout (built by
``python -m benchmarks.vfio_user.bench --build-only``); the sink writes 32 KiB messages,
the most libvfio-user is sure to read whole.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from vfiomig._units import parse_size
from vfiomig.transport import unix_socket_listening
from vfiomig.vfio_user import MigState, VfioUserDevice, VfioUserSink, serve_vfio_user
from vfiomig.vfio_user.client._sink import DEFAULT_MAX_WRITE

RING = 4 << 20
_SERVE = "from vfiomig.bench._vfio_user import main; main()"
#: How long a server process may take to create its socket.
START_TIMEOUT = 10.0


class NullEmulator:
    """Copies each MIG_DATA_WRITE into a 4 MiB ring (a device that stores its state) and
    takes every byte; in STOP_COPY returns ``read_total`` bytes, then 0."""

    def __init__(self, read_total: int = 0) -> None:
        self.read_total = read_total
        self.view = memoryview(bytearray(b"\xa5" * RING))
        self.written = 0
        self.read = 0

    @property
    def region_sizes(self) -> Sequence[int]:
        return ()

    def transition(self, state: MigState) -> None:
        if state == MigState.STOP_COPY:
            self.read = 0

    def read_data(self, size: int) -> bytes | memoryview:
        n = min(size, self.read_total - self.read)
        off = self.read % RING
        first = min(n, RING - off)
        self.read += n
        if first == n:  # one copy, as vu_server.c's memcpy into libvfio-user's buffer
            return bytes(self.view[off : off + n])
        return b"".join((self.view[off : off + first], self.view[: n - first]))

    def write_data(self, data: memoryview) -> int:
        n = len(data)
        off = self.written % RING
        first = min(n, RING - off)
        self.view[off : off + first] = data[:first]
        self.view[: n - first] = data[first:]
        self.written += n
        return n

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        raise OSError(22, "no regions")

    def region_write(self, index: int, offset: int, data: memoryview) -> int:
        raise OSError(22, "no regions")

    def reset(self) -> None:
        pass


class StoringEmulator(NullEmulator):
    """Keeps the stream in one preallocated buffer of ``capacity`` bytes (its pages
    touched up front), copied there by ``write_data``; a stream longer than that starts
    over at 0 once a write would not fit. Its STOP_COPY stream (``read_total`` bytes)
    comes from that buffer as views, no copy (the server sends a reply before it calls
    the emulator again)."""

    def __init__(self, capacity: int, read_total: int = 0) -> None:
        super().__init__(read_total)
        self.store = memoryview(bytearray(b"\xa5") * capacity)
        self.at = 0  # where the next write goes

    def _place(self, size: int) -> int:
        if self.at + size > len(self.store):
            if size > len(self.store):
                raise OSError(errno.EFBIG, f"write of {size} bytes ({len(self.store)} stored)")
            self.at = 0
        return self.at

    def read_data(self, size: int) -> memoryview:
        off = self.read % len(self.store)
        n = min(size, self.read_total - self.read, len(self.store) - off)
        self.read += n
        return self.store[off : off + n]

    def write_data(self, data: memoryview) -> int:
        at = self._place(len(data))
        self.store[at : at + len(data)] = data
        self.at += len(data)
        self.written += len(data)
        return len(data)


class DirectStoringEmulator(StoringEmulator):
    """`StoringEmulator` whose writes are received straight into the buffer (`WriteBuffer`)."""

    def write_buffer(self, size: int) -> memoryview:
        at = self._place(size)
        return self.store[at : at + size]

    def write_commit(self, size: int) -> None:
        self.at += size
        self.written += size


def lvu_server() -> str | None:
    """The libvfio-user device server's path, or None when it is not built."""
    env = os.environ.get("VFIOMIG_LVU_SERVER")
    if env:
        return env if os.access(env, os.X_OK) else None
    root = Path(__file__).resolve().parents[2]
    built = root / "benchmarks" / "vfio_user" / "build" / "vu_server"
    return str(built) if os.access(built, os.X_OK) else None


async def start_servers(
    kind: str, tmpdir: str, devices: int
) -> tuple[list[trio.Process], list[VfioUserSink]]:
    """One server process and one sink per device. The caller closes the sinks, then
    calls `stop_servers`, also when this raises after starting some."""
    procs: list[trio.Process] = []
    sinks: list[VfioUserSink] = []
    for i in range(devices):
        path = os.path.join(tmpdir, f"vu{i}.sock")
        if kind == "vfio-user-lvu":
            server = lvu_server()
            if server is None:
                raise RuntimeError("vfio-user-lvu: libvfio-user's server is not built")
            argv = [server, path, "0"]
            sink = VfioUserSink(path, max_write=DEFAULT_MAX_WRITE)
        else:
            argv = [sys.executable, "-c", _SERVE, path]
            sink = VfioUserSink(path, max_write=1 << 20)
        procs.append(await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL))
        with trio.fail_after(START_TIMEOUT):
            # libvfio-user binds, then listens; vfiomig's server links its path once
            # listening (a probe connection would be libvfio-user's one client).
            ready = unix_socket_listening if kind == "vfio-user-lvu" else os.path.exists
            while not ready(path):
                if procs[-1].poll() is not None:
                    raise RuntimeError(f"{kind}: server exited with {procs[-1].returncode}")
                await trio.sleep(0.01)
        sinks.append(sink)
    return procs, sinks


async def stop_servers(procs: Sequence[trio.Process]) -> None:
    """Stop the servers (libvfio-user's exits when its client left; vfiomig's serves
    until terminated)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """``SOCK [READ_TOTAL] [--store SIZE [--direct]] [--once]``: serve a `NullEmulator`
    (or a `StoringEmulator`, a `DirectStoringEmulator`) on SOCK until terminated (or
    until its first client has gone: then its CPU seconds serving, as JSON on stdout)."""
    parser = argparse.ArgumentParser(prog="null_device")
    parser.add_argument("sock")
    parser.add_argument("read_total", nargs="?", type=parse_size, default=0)
    parser.add_argument("--store", type=parse_size, help="keep the stream in this many bytes")
    parser.add_argument("--direct", action="store_true", help="with --store: WriteBuffer")
    parser.add_argument("--once", action="store_true", help="exit after the first client")
    args = parser.parse_args(argv)
    emulator: NullEmulator = NullEmulator(args.read_total)
    if args.store:
        kind = DirectStoringEmulator if args.direct else StoringEmulator
        emulator = kind(args.store, args.read_total)
    before = os.times()
    trio.run(partial(serve_vfio_user, args.sock, VfioUserDevice(emulator), once=args.once))
    after = os.times()
    if args.once:  # what serving took, start-up and the emulator's allocation left out
        spent = after.user - before.user + after.system - before.system
        print(json.dumps({"serve_cpu_s": round(spent, 3)}), flush=True)
