"""Helpers that users and vfiomig's own tests share: synthetic states, packet streams in
chosen arrival orders, and an in-memory sink and config target."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

import trio

from vfiomig._core._wire import (
    VFIO_FLAG_CONFIG_STATE,
    Endian,
    encode_handshake,
    encode_packet,
    wrap_config,
)
from vfiomig.sinks import Chunk, ConfigTarget, Sink
from vfiomig.sources._simple import SYNTH_BLOCK, synth_block, synth_config_body

__all__ = [
    "MemoryConfig",
    "MemorySink",
    "channel_streams",
    "device_packets",
    "synth_bytes",
    "synth_config",
    "synth_sha256",
]


def synth_bytes(size: int, seed: int = 0) -> bytes:
    """The whole synthetic state that ``synth:SIZE:SEED`` streams (for small sizes)."""
    out = bytearray()
    for block in range((size + SYNTH_BLOCK - 1) // SYNTH_BLOCK):
        out += synth_block(seed, block)
    return bytes(out[:size])


def synth_sha256(size: int, seed: int = 0) -> str:
    """sha256 of the synthetic state, computed block by block (any size)."""
    h = hashlib.sha256()
    left = size
    block = 0
    while left > 0:
        data = synth_block(seed, block)
        h.update(data[: min(left, SYNTH_BLOCK)])
        left -= SYNTH_BLOCK
        block += 1
    return h.hexdigest()


def synth_config(seed: int = 0) -> bytes:
    """The config blob ``synth:SIZE:SEED`` sends (markers included)."""
    return wrap_config(synth_config_body(seed))


def device_packets(
    idstr: str,
    instance: int,
    state: bytes,
    config: bytes,
    packet_size: int,
    *,
    endian: Endian = "be",
) -> list[bytes]:
    """Every packet of one device in idx order, config packet last, as wire bytes."""
    chunks = [state[i : i + packet_size] for i in range(0, len(state), packet_size)]
    packets = [encode_packet(idstr, instance, i, 0, c, endian=endian) for i, c in enumerate(chunks)]
    packets.append(
        encode_packet(idstr, instance, len(chunks), VFIO_FLAG_CONFIG_STATE, config, endian=endian)
    )
    return packets


def channel_streams(
    packets: Sequence[bytes], channels: int, uuid: bytes, *, seed: int | None = None
) -> list[bytes]:
    """Spread packets over channels (round-robin, or at random with ``seed``) and return
    each channel's whole byte stream, handshake first."""
    rng = random.Random(seed)
    streams = [bytearray(encode_handshake(uuid, c)) for c in range(channels)]
    for k, packet in enumerate(packets):
        c = k % channels if seed is None else rng.randrange(channels)
        streams[c] += packet
    return [bytes(s) for s in streams]


def slices(data: bytes, rng: random.Random, max_size: int) -> Iterator[bytes]:
    """Cut ``data`` into random-sized slices (1 to ``max_size`` bytes)."""
    i = 0
    while i < len(data):
        n = rng.randint(1, max_size)
        yield data[i : i + n]
        i += n


class MemorySink(Sink):
    """Keeps the stream in memory and records every call (for tests and examples)."""

    description = "memory"

    def __init__(self, *, fail_at: int | None = None) -> None:
        self.data = bytearray()
        self.calls: list[str] = []
        self.fail_at = fail_at  # raise EIO when the stream would pass this many bytes

    async def start(self) -> None:
        self.calls.append("start")

    async def write(self, chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:
            if self.fail_at is not None and len(self.data) + len(chunk) > self.fail_at:
                raise OSError(5, "Input/output error")
            self.data += chunk
        self.calls.append("write")
        await trio.lowlevel.checkpoint()

    async def finish(self) -> None:
        self.calls.append("finish")

    async def abort(self) -> None:
        self.calls.append("abort")

    async def aclose(self) -> None:
        self.calls.append("aclose")


class MemoryConfig(ConfigTarget):
    """Keeps the config blob; ``loaded_before`` records the sink's calls at that moment."""

    description = "memory config"

    def __init__(self, sink: MemorySink | None = None) -> None:
        self.data: bytes | None = None
        self.sink = sink
        self.sink_calls_at_load: list[str] = []

    async def load_config(self, data: bytes) -> None:
        self.data = data
        if self.sink is not None:
            self.sink_calls_at_load = list(self.sink.calls)
