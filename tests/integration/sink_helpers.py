"""A migration into one sink, through a real receive session and `send_migration`, for the
sink tests (the fd sinks and the vfio-user sink)."""

from __future__ import annotations

import trio

from vfiomig import DeviceSetup, ReceiverConfig, send_migration
from vfiomig.receive import MigrationFailed, Session, serve_receiver
from vfiomig.send import SendDevice, SendError
from vfiomig.sinks._base import Sink
from vfiomig.sources import SynthSource
from vfiomig.testing import MemoryConfig

UUID = bytes(range(16))


async def serve_ignoring_failure(
    config: ReceiverConfig, task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED
) -> None:
    try:
        await serve_receiver(config, task_status=task_status)
    except MigrationFailed:
        pass


async def migrate(
    sink: Sink,
    *,
    size: int,
    packet_size: int,
    channels: int = 1,
    seed: int = 1,
    sink_timeout: float = 60.0,
    channel_rate: float | None = None,
) -> Session:
    """Send ``size`` bytes of device ``d`` (``synth:SIZE:SEED``) into ``sink``, each channel
    paced to ``channel_rate`` if given; return the ended session. The sender may see the
    receiver close first: that is fine here."""
    setup = DeviceSetup("d", 0, sink, MemoryConfig())
    cfg = ReceiverConfig(uuid=UUID, channels=channels, devices=[setup], sink_timeout=sink_timeout)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            session: Session = await nursery.start(serve_ignoring_failure, cfg)
            try:
                await send_migration(
                    connect_to=session.bound,
                    channels=channels,
                    uuid=UUID,
                    devices=[SendDevice("d", 0, SynthSource(size, seed))],
                    packet_size=packet_size,
                    channel_rate=channel_rate,
                )
            except SendError:
                pass
    return session


async def failed_migration(
    sink: Sink, *, size: int, packet_size: int, sink_timeout: float = 60.0
) -> str | None:
    """`migrate` over one channel; the device's error."""
    session = await migrate(sink, size=size, packet_size=packet_size, sink_timeout=sink_timeout)
    return session.report().devices[0].error
