"""A paced sender (``channel_rate``, ``link_rate``): never ahead of its link model, and
the packets due together leave in one write, not one wakeup per packet.

bench's default matrix paces every channel to 32 MiB/s; at 4 KiB packets that is 8,192
packets a second per channel, and a wakeup per packet cost the sender more CPU than it
had (``vfiomig bench --packet-sizes 4K`` on 2 CPUs: the sender "waited 70 % of its
sending time", 0.11 of the link model's bound). The trio sender's channels run on
loopback sockets under trio's mock clock: how many writes and how long the send took
are exact. The C send path's threads pace per channel too (``channel_rate``), in real
time: never early is what can be checked there without timing the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

import vfiomig.send._channel as channel_module
from vfiomig import _core as core
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
    async with listener, trio.open_nursery() as nursery:

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
    monkeypatch.setenv("VFIOMIG_SEND_THREADS", "0")  # the trio sender's Writer
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


@pytest.mark.skipif(getattr(core, "SendJob", None) is None, reason="the C send path's")
@pytest.mark.parametrize("direct", ["1", "0"])
def test_the_c_send_path_paces_each_channel_never_early(
    direct: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channel threads making their own packets (direct) or fed by a reader: each
    channel's share leaves no sooner than its rate allows (a channel carries 128 packets
    of 4 KiB and their headers: at 8 MiB/s, 68 ms)."""
    import vfiomig.send._threads as threads_module

    monkeypatch.setenv("VFIOMIG_SEND_DIRECT", direct)
    chosen: list[bool] = []
    real = threads_module.native_streams

    def spy(*args: object, **kwargs: object) -> object:
        streams = real(*args, **kwargs)  # type: ignore[arg-type]
        chosen.append(streams is not None)
        return streams

    import vfiomig.send._sender as sender_module

    monkeypatch.setattr(sender_module, "native_streams", spy)
    rate = 8 << 20
    elapsed, received = trio.run(lambda: _paced_send(2, channel_rate=rate))
    assert chosen == [True]
    per_channel = (SIZE // PACKET // 2) * (PACKET + 288)
    assert received > SIZE
    assert elapsed >= per_channel / rate


@pytest.mark.skipif(getattr(core, "SendJob", None) is None, reason="the C send path's")
@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_cancel_ends_a_paced_threads_sleep(direct: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel thread sleeping until its next packet is due (1 MiB/s: seconds per
    packet) stops at once when the send is cancelled; no thread is left."""
    monkeypatch.setenv("VFIOMIG_SEND_DIRECT", direct)

    async def main() -> float:
        with trio.move_on_after(0.5) as scope:
            await _paced_send(2, channel_rate=1 << 20)
        assert scope.cancelled_caught
        return trio.current_time() - scope.deadline

    assert trio.run(main) < 5  # the join after the cancel is short
    left = []
    for task in Path("/proc/self/task").iterdir():
        try:
            left.append((task / "comm").read_text().strip())
        except OSError:
            pass  # gone meanwhile
    assert not [name for name in left if name.startswith(("vfm-send-", "vfm-read-"))]
