"""Helpers for the fault-injection, hostile-peer and soak tests: a receive session run in
a nursery, raw data channels, and a leak check of fds and threads."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from vfiomig import DeviceSetup, MigrationFailed, ReceiverConfig, SessionReport, serve_receiver
from vfiomig.receive import Session
from vfiomig.sinks import Sink
from vfiomig.testing import MemoryConfig, MemorySink, synth_config

UUID = bytes(range(16))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def live_threads() -> int:
    """Threads other than trio's idle worker cache (which keeps threads for a while)."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("Trio thread"))


@dataclass
class Snapshot:
    fds: set[str]
    threads: int

    @classmethod
    def take(cls) -> Snapshot:
        return cls(open_fds(), live_threads())

    def check(self) -> None:
        """Nothing opened since the snapshot is still open, no thread is left."""
        leaked = open_fds() - self.fds
        # An fd number may be reused for something the test still holds; name the targets.
        named = {fd: _target(fd) for fd in leaked}
        named = {fd: t for fd, t in named.items() if t is not None}
        assert not named, f"fds left open: {named}"
        assert live_threads() <= self.threads, "threads left behind"


def _target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # closed in the meantime (the listdir's own fd)


@dataclass
class Running:
    session: Session
    outcome: list[SessionReport | MigrationFailed]
    sinks: list[Sink]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.session.bound[0][4:].rsplit(":", 1)
        return host, int(port)

    def failed(self) -> MigrationFailed:
        assert self.outcome, "session still running"
        exc = self.outcome[0]
        assert isinstance(exc, MigrationFailed), exc
        return exc


def devices(sinks: Sequence[Sink]) -> list[DeviceSetup]:
    return [
        DeviceSetup(
            f"0000:00:0{i}.0/vfio",
            0,
            sink,
            MemoryConfig(sink if isinstance(sink, MemorySink) else None),
        )
        for i, sink in enumerate(sinks)
    ]


@asynccontextmanager
async def receiver(
    sinks: Sequence[Sink], *, channels: int = 2, **options: object
) -> AsyncIterator[Running]:
    """Run a receive session on loopback until the block and the session are both done."""
    config = ReceiverConfig(uuid=UUID, channels=channels, devices=devices(sinks), **options)  # type: ignore[arg-type]
    outcome: list[SessionReport | MigrationFailed] = []

    async def serve(task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            outcome.append(await serve_receiver(config, task_status=task_status))
        except MigrationFailed as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        session = await nursery.start(serve)
        yield Running(session, outcome, list(sinks))


async def connect(running: Running) -> trio.SocketStream:
    return await trio.open_tcp_stream(*running.address)


def reset(stream: trio.SocketStream) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


def idstr(i: int) -> str:
    return f"0000:00:0{i}.0/vfio"


CONFIG = synth_config(0)
