"""The sequential baseline: one stream in the vhost-user back-end style, both ends.

vhost-user moves a back-end's state over one fd as a plain byte stream; here each device's
state is a run of be32-length-prefixed chunks ended by a zero-length chunk, followed by one
length-prefixed config blob, devices one after another on one channel. The receiving end
writes to the same sink models as the multifd runs, so the ratio of the two downtimes is
what parallel channels buy on the same device and link.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from vfiomig.sinks import ConfigTarget, Sink
from vfiomig.sources import Source
from vfiomig.transport import connect, open_listener, parse_address, tune_socket

_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class SeqReport:
    """The receiving end's view: first chunk header to last device loaded (trio time)."""

    started_at: float
    loaded_at: list[float]
    bytes: int


async def send_sequential(
    address: str, sources: Sequence[Source], chunk_size: int, rate: float | None
) -> tuple[int, float]:
    """Send every source in turn over one stream; return (wire bytes, monotonic start).

    ``rate`` paces the stream like a multifd channel: a chunk leaves once the link could
    have carried it.
    """
    stream = await connect(parse_address(address))
    tune_socket(stream)
    sent = 0
    async with stream:
        start = trio.current_time()
        t0 = time.monotonic()
        for source in sources:
            await source.start()
            while True:
                data = await source.read(chunk_size)
                sent += _LEN.size + len(data)
                if rate:
                    await trio.sleep_until(start + sent / rate)
                await stream.send_all(_LEN.pack(len(data)))
                if not data:
                    break
                await stream.send_all(data)
            blob = await source.config_blob()
            sent += _LEN.size + len(blob)
            await stream.send_all(_LEN.pack(len(blob)) + blob)
            await source.finish()
    return sent, t0


class _Reader:
    """Exact-size reads from a socket stream, straight into the caller's buffer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.sock = stream.socket

    async def read(self, n: int) -> bytearray:
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            k = await self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError(f"sequential stream ended {n - got} bytes short")
            got += k
        view.release()
        return out


async def serve_sequential(
    listen: str,
    sinks: Sequence[Sink],
    configs: Sequence[ConfigTarget],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> SeqReport:
    """Accept one stream and load ``len(sinks)`` devices from it, in order.

    ``task_status.started`` gets the bound address. Cancellation: the stream and the
    listener are closed.
    """
    listener, bound = await open_listener(parse_address(listen))
    async with listener:
        task_status.started(str(bound))
        stream = await listener.accept()
    tune_socket(stream)
    loaded: list[float] = []
    total = 0
    started_at: float | None = None
    async with stream:
        reader = _Reader(stream)
        for sink, config in zip(sinks, configs, strict=True):
            await sink.start()
            while True:
                (n,) = _LEN.unpack(await reader.read(_LEN.size))
                if started_at is None:
                    started_at = trio.current_time()
                if n == 0:
                    break
                await sink.write([await reader.read(n)])
                total += n
            (n,) = _LEN.unpack(await reader.read(_LEN.size))
            await config.load_config(bytes(await reader.read(n)))
            await sink.finish()
            loaded.append(trio.current_time())
    assert started_at is not None
    return SeqReport(started_at, loaded, total)


__all__ = ["SeqReport", "send_sequential", "serve_sequential"]
