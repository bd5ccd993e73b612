"""A paced sender (``channel_rate``, ``link_rate``): never ahead of its link model, and
the packets due together leave in one write, not one wakeup per packet.

bench's default matrix paces every channel to 32 MiB/s; at 4 KiB packets that is 8,192
packets a second per channel, and a wakeup per packet cost the sender more CPU than it
had (``vfiomig bench --packet-sizes 4K`` on 2 CPUs: the sender "waited 70 % of its
sending time", 0.11 of the link model's bound). The channels run on loopback sockets
under trio's mock clock: how many writes and how long the send took are exact.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import vfiomig.send._channel as channel_module
from vfiomig._core._wire import HANDSHAKE_SIZE
from vfiomig.send import SendDevice, send_migration
from vfiomig.sources import SynthSource

UUID = bytes(range(16))
IDSTR = "0000:00:04.0/vfio"
SIZE = 1 << 20
PACKET = 4096


async def _drain(stream: trio.SocketStream, got: list[int]) -> None:
    async with stream:
        total = 0
        while chunk := await stream.receive_some(1 << 20):
            total += len(chunk)
        got.append(total - HANDSHAKE_SIZE)


async def _paced_send(channels: int, **pacing: float) -> tuple[float, int]:
    """The send's virtual seconds and the bytes the receiver got."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    got: list[int] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            for _ in range(channels):
                nursery.start_soon(_drain, await listener.accept(), got)

        nursery.start_soon(accept)
        start = trio.current_time()
        await send_migration(
            connect_to=[f"tcp:127.0.0.1:{port}"],
            channels=channels,
            uuid=UUID,
            devices=[SendDevice(IDSTR, 0, SynthSource(SIZE, 3))],
            packet_size=PACKET,
            **pacing,  # type: ignore[arg-type]
        )
        elapsed = trio.current_time() - start
    await listener.aclose()
    return elapsed, sum(got)


@pytest.mark.parametrize(
    ("pacing", "channels", "rate"),
    [({"channel_rate": 32 << 20}, 2, 64 << 20), ({"link_rate": 32 << 20}, 2, 32 << 20)],
)
def test_a_paced_channel_sends_bursts_never_early(
    pacing: dict[str, float], channels: int, rate: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = 0
    real = channel_module.Writer._write

    async def counted(self: channel_module.Writer, max_packets: int) -> None:
        nonlocal writes
        writes += 1
        await real(self, max_packets)

    monkeypatch.setattr(channel_module.Writer, "_write", counted)
    clock = trio.testing.MockClock(autojump_threshold=0)
    elapsed, received = trio.run(lambda: _paced_send(channels, **pacing), clock=clock)
    packets = SIZE // PACKET
    wire = SIZE + (packets + 1) * 288  # every packet's header, the config packet's too
    assert received > wire  # the config body on top
    # Never ahead of the link model: the last data byte cannot leave before wire / rate.
    assert elapsed >= SIZE / rate
    # ... and not much behind it: a burst leaves at most PACE_QUANTUM late.
    assert elapsed <= wire / rate + 0.05
    # Bursts, not a write per packet: at 32 MiB/s a millisecond carries 8 packets.
    assert writes < packets / 4, writes
