"""The sink models of a run: ``null``, ``pipe`` (drained by another process), ``tmpfs`` (a
file under /dev/shm), ``device`` (`DeviceModelSink`), and ``vfio-user`` /
``vfio-user-lvu`` (a real vfio-user device server per device, see `_vfio_user`).

`open_sinks` creates one sink per device and cleans up everything it made (drainer
processes, files) when the run is over, whatever happened.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from vfiomig.sinks import FdSink, NullSink, Sink

from ._model import DeviceModelSink, Overhead
from ._vfio_user import start_servers, stop_servers

SINK_KINDS = ("null", "pipe", "tmpfs", "device", "vfio-user", "vfio-user-lvu")

#: Pipe capacity asked with F_SETPIPE_SZ (the default 64 KiB makes every write a wake-up).
PIPE_SIZE = 1 << 20
#: Where tmpfs sinks go: /dev/shm, or the temp dir where there is none.
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


@dataclass(slots=True)
class SinkSet:
    """The sinks of one run and how much each has taken."""

    kind: str
    sinks: list[Sink]
    drainers: list[trio.Process] = field(default_factory=list)

    def bytes_written(self) -> int:
        return sum(int(getattr(s, "bytes_written", 0)) for s in self.sinks)

    def first_write_at(self) -> float | None:
        times = [s.first_write_at for s in self.sinks if isinstance(s, DeviceModelSink)]
        return min((t for t in times if t is not None), default=None)

    def late_seconds(self) -> float:
        return sum(s.late_seconds for s in self.sinks if isinstance(s, DeviceModelSink))


def _drain_command() -> list[str]:
    cat = shutil.which("cat")
    if cat is None:  # pragma: no cover - every Linux has cat
        raise RuntimeError("no `cat` to drain the pipe sink")
    return [cat]


@contextlib.asynccontextmanager
async def open_sinks(
    kind: str,
    devices: int,
    *,
    bandwidth: float,
    latency: float,
    overhead: Overhead,
) -> AsyncIterator[SinkSet]:
    """Yield ``devices`` sinks of ``kind``; close them and their helpers afterwards.

    ``pipe``: a pipe per device, enlarged to `PIPE_SIZE`, whose read end a ``cat`` process
    copies to /dev/null; the write end is non-blocking so the loader writes it from the
    event loop. ``tmpfs``: a file per device in a fresh directory under /dev/shm (or the
    temp dir if /dev/shm is missing), removed afterwards.
    """
    if kind not in SINK_KINDS:
        raise ValueError(f"sink model {kind!r} is unknown (known: {', '.join(SINK_KINDS)})")
    sinks: list[Sink] = []
    drainers: list[trio.Process] = []
    servers: list[trio.Process] = []
    tmpdir: str | None = None
    try:
        if kind.startswith("vfio-user"):
            tmpdir = tempfile.mkdtemp(prefix="vfiomig-bench-")
            servers, vu_sinks = await start_servers(kind, tmpdir, devices)
            sinks = list(vu_sinks)
        elif kind == "null":
            sinks = [NullSink() for _ in range(devices)]
        elif kind == "device":
            sinks = [DeviceModelSink(bandwidth, latency, overhead) for _ in range(devices)]
        elif kind == "tmpfs":
            tmpdir = tempfile.mkdtemp(prefix="vfiomig-bench-", dir=SHM)
            for i in range(devices):
                path = os.path.join(tmpdir, f"device{i}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                sinks.append(FdSink(fd, owned=True, description=f"file:{path}"))
        else:
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for _ in range(devices):
                    rfd, wfd = os.pipe2(os.O_CLOEXEC)
                    try:
                        fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                    except OSError:
                        pass  # capped by /proc/sys/fs/pipe-max-size: keep the default
                    try:
                        proc = await trio.lowlevel.open_process(
                            _drain_command(), stdin=rfd, stdout=devnull
                        )
                    finally:
                        os.close(rfd)
                    drainers.append(proc)
                    os.set_blocking(wfd, False)
                    sinks.append(FdSink(wfd, owned=True, description="pipe to cat"))
            finally:
                os.close(devnull)
        yield SinkSet(kind, sinks, drainers)
    finally:
        with trio.CancelScope(shield=True):
            for sink in sinks:
                await sink.aclose()  # closing a pipe's write end lets its drainer finish
            for proc in drainers:
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await stop_servers(servers)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


__all__ = ["SINK_KINDS", "SinkSet", "open_sinks"]
