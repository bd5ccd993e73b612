"""Helpers for the control-channel tests: a receive session with a control server, and
raw data channels."""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vfiomig import DeviceSetup, MigrationFailed, ReceiverConfig, SessionReport, serve_receiver
from vfiomig.control import ControlClient, ControlServer
from vfiomig.receive import Session
from vfiomig.sinks import Sink
from vfiomig.testing import channel_streams, device_packets, synth_config
from vfiomig.transport import connect, parse_address

UUID = bytes(range(16))
IDSTR = "0000:00:04.0/vfio"
STATE = random.Random(1).randbytes(200_000)
CONFIG = synth_config(3)
PRECOPY = b"precopy-bytes:" + bytes(range(256)) * 4


@dataclass
class Running:
    session: Session
    control: ControlServer
    outcome: list[SessionReport | MigrationFailed]

    @property
    def data_address(self) -> str:
        return self.session.bound[0]

    @property
    def control_address(self) -> str:
        assert self.control.bound is not None
        return self.control.bound


@asynccontextmanager
async def running_receiver(
    tmp_path: Path,
    sinks: Sequence[tuple[str, int, Sink]],
    *,
    channels: int = 2,
    gate: str = "control",
    control_tcp: bool = False,
    tls: ssl.SSLContext | None = None,
    control_pending: int = 8,
    **options: Any,
) -> AsyncIterator[Running]:
    """Start a receive session with a control server (config via ``config`` events)."""
    address = "tcp:127.0.0.1:0" if control_tcp else f"unix:{tmp_path}/ctl.sock"
    control = ControlServer(
        address,
        tls=tls,
        max_pending=control_pending,
        progress_interval=options.pop("progress", 0.05),
        max_message=options.pop("max_message", 1 << 20),
    )
    config = ReceiverConfig(
        uuid=UUID,
        channels=channels,
        devices=[DeviceSetup(idstr, instance, sink) for idstr, instance, sink in sinks],
        gate=gate,
        config_target=control.config_target,
        tls=tls,
        **options,
    )
    outcome: list[SessionReport | MigrationFailed] = []

    async def serve(task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            outcome.append(
                await serve_receiver(config, task_status=task_status, extra_tasks=[control.serve])
            )
        except MigrationFailed as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        session = await nursery.start(serve)
        yield Running(session, control, outcome)


async def send_channel(
    address: str, data: bytes, tls: ssl.SSLContext | None = None, *, may_be_cut: bool = False
) -> None:
    """Open one data channel, send ``data`` (handshake included), close it.

    ``may_be_cut``: the session is expected to fail, and a failing receiver closes its
    channels, so the sender may see a reset while it still has bytes to send.
    """
    addr = parse_address(address)
    stream: trio.abc.Stream = await connect(addr)
    if tls is not None:
        stream = trio.SSLStream(stream, tls, server_hostname=addr.host)
    async with stream:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            if not may_be_cut:
                raise


def streams(idstr: str = IDSTR, state: bytes = STATE, channels: int = 2) -> list[bytes]:
    return channel_streams(device_packets(idstr, 0, state, CONFIG, 16384), channels, UUID)


async def expect(ctl: ControlClient, kind: str) -> dict[str, Any]:
    """The next event of ``kind``; progress and config events on the way are skipped
    (and, waiting for ``done``, error and loaded events)."""
    skip = {"done": ("progress", "error", "config", "loaded"), "config": ("progress",)}.get(
        kind, ("progress", "config")
    )
    while True:
        event = await ctl.next_event()
        assert event is not None, f"connection closed while waiting for {kind}"
        if event["type"] == kind:
            return event
        assert event["type"] in skip, event
