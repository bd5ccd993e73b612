"""How `send_migration` fails: a sender that fails on one channel resets its other
channels (RST, never an orderly FIN that reads as the end of a channel), tells the
receiver why on the control channel before they break, and reports its own failure
first (SPEC.md §5; `vfiomig.send._sender`).

Before this, a sender whose channel was reset closed its other channels in order: the
receiver saw a channel end inside a packet (exactly what that channel had sent, e.g.
128 KiB) and reported that, and the sender printed the receiver's error for its own."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio

from tests.integration.control_helpers import IDSTR, UUID, running_receiver
from vfiomig import MigrationFailed, SendDevice, send_migration
from vfiomig._core._wire import HANDSHAKE_SIZE
from vfiomig.send import SendError
from vfiomig.send._control import ReceiverFailed
from vfiomig.sources._simple import open_synth_source
from vfiomig.testing import MemorySink

#: More than two channels' socket buffers hold on loopback: the sender cannot be done
#: before channel 0 is read, and channel 0 is read only after channel 1 was reset.
STATE_SIZE = 64 << 20


async def _receive_all(stream: trio.SocketStream) -> str:
    """Read ``stream`` to its end: ``"fin"`` (an orderly end) or ``"reset"``."""
    try:
        while await stream.receive_some(1 << 20):
            pass
    except trio.BrokenResourceError as exc:
        assert isinstance(exc.__cause__, ConnectionResetError), repr(exc.__cause__)
        return "reset"
    return "fin"


async def test_a_channel_reset_resets_the_other_channels() -> None:
    """A receiver resets channel 1 after its handshake while channel 0 waits unread: the
    sender fails on channel 1 and resets channel 0, which reads as a reset, not as an
    orderly end after a whole or a part of a packet."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    ends: list[str] = []

    async def receiver() -> None:
        channels = {}
        for _ in range(2):
            stream = await listeners[0].accept()
            hello = b""
            while len(hello) < HANDSHAKE_SIZE:
                hello += await stream.receive_some(HANDSHAKE_SIZE - len(hello))
            channels[hello[24]] = stream
        linger = struct.pack("ii", 1, 0)
        channels[1].socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await channels[1].aclose()  # a reset: the sender fails on channel 1
        ends.append(await _receive_all(channels[0]))
        await channels[0].aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            with pytest.raises(SendError, match=r"^channel 1: the receiver closed the channel"):
                await send_migration(
                    connect_to=[f"tcp:127.0.0.1:{port}"],
                    channels=2,
                    uuid=UUID,
                    devices=[SendDevice(IDSTR, 0, open_synth_source(f"{STATE_SIZE}:1"))],
                    packet_size=256 << 10,
                )
    await listeners[0].aclose()
    assert ends == ["reset"]


async def test_a_failed_channel_is_told_to_the_receiver_and_reported_first(
    tmp_path: Path,
) -> None:
    """With a control channel, the sender's own failure (channel 1 cannot connect, after
    channel 0 was admitted) reaches the receiver as ``abort`` before channel 0 breaks:
    the receiver fails at once with the sender's cause (no wait for a channel that will
    never come), and the sender's error starts with its own failure."""
    refused = socket.socket()  # a port nothing listens on: bound, never listening
    refused.bind(("127.0.0.1", 0))
    nowhere = f"tcp:127.0.0.1:{refused.getsockname()[1]}"
    with refused, trio.fail_after(30):
        async with running_receiver(tmp_path, [(IDSTR, 0, MemorySink())]) as rx:
            with pytest.raises(ReceiverFailed) as caught:
                await send_migration(
                    connect_to=[rx.data_address, nowhere],
                    channels=2,
                    uuid=UUID,
                    devices=[SendDevice(IDSTR, 0, open_synth_source("200000:1"))],
                    packet_size=4096,
                    control=rx.control_address,
                    control_timeout=10,
                )
    message = str(caught.value)
    assert message.startswith(f"channel 1: cannot connect to {nowhere}: "), message
    assert message.endswith("; receiver failed: it aborted the migration"), message
    assert isinstance(caught.value.__cause__, SendError)
    failed = rx.outcome[0]
    assert isinstance(failed, MigrationFailed)
    assert f"{IDSTR}/0: migration aborted: channel 1: cannot connect" in str(failed), str(failed)
