"""The sender: packetise each device's source and spread the packets over the channels.

QEMU's source does the same (``vfio_multifd_save_complete_precopy_thread``): it reads the
device's state in chunks, sends chunk ``i`` as packet ``idx = i`` and, after the last one,
the config blob as packet ``idx = N`` with the config flag, choosing channels round-robin.

Orders (``order=``):
- ``roundrobin``: QEMU's: packet k of the session goes to channel k mod n.
- ``random``: each packet goes to a random channel (seeded); every channel still carries
  its packets in increasing idx, so the receiver's backpressure cannot deadlock.
- ``shuffle``: packets are permuted within windows of ``window`` packets, then spread at
  random. This breaks the queue-order rule of SPEC.md §2 on purpose: it needs a receiver
  budget of at least ``window`` packets.
- ``idx0-last``: idx 0 of every device goes alone on channel 0, which waits until every
  other channel has sent everything or is blocked by the receiver's flow control. With a
  budget smaller than the state, idx 0 thus arrives as late as the receiver allows.

The sender streams: it holds at most `CHANNEL_QUEUE` packets or `CHUNK` bytes per channel
(a little more while a chunk is being spread), never the whole state. Each channel's
packets wait in its `Outbox` (the core's: header and data, the data not copied), which the
channel's task writes in batches, one ``sendmsg`` per IOV_MAX iovecs with the C core; a
stream source is read a `CHUNK` at a time into pooled buffers, each cut into packets and
spread over the channels with one call. The channel of every packet is chosen in the
same order as a packet-at-a-time sender would, so each channel carries the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any

import trio

from vfiomig import _core as core
from vfiomig._core._errors import UsageError, VfioMigError
from vfiomig._core._wire import VFIO_FLAG_CONFIG_STATE, Endian, encode_handshake
from vfiomig.send._channel import CHUNK, Link, Progress, Writer
from vfiomig.send._close import CLOSE_TIMEOUT, channel_error, describe, end_channels
from vfiomig.send._control import send_with_control
from vfiomig.send._threads import native_streams, send_threaded
from vfiomig.send._types import (
    PrecopyOptions,
    SendDevice,
    SendError,
    SendReport,
    SendStatus,
)
from vfiomig.sources import Source
from vfiomig.transport import connect, parse_address, reset_on_close, tune_socket

log = logging.getLogger("vfiomig")

ORDERS = ("roundrobin", "random", "shuffle", "idx0-last")

#: Packets a channel's queue holds before a producer waits (or `CHUNK` bytes, if more).
CHANNEL_QUEUE = 4
#: The longest a source's abort (its device back to running) may take after a failure.
ABORT_TIMEOUT = 10.0


async def _produce_guarded(
    failures: list[SendError], scope: trio.CancelScope, device: SendDevice, *args: Any
) -> None:
    try:
        await _produce(device, *args)
    except (OSError, VfioMigError) as exc:
        if isinstance(exc, SendError):
            failures.append(exc)
        else:
            failures.append(device.read_failed(exc))
        scope.cancel()


class _Dispatcher:
    """Chooses the channel of each packet according to the order, and holds producers
    back while a channel's queue is over its limit."""

    def __init__(self, writers: list[Writer], order: str, seed: int, limit: int) -> None:
        self.writers = writers
        self.outboxes = [w.outbox for w in writers]
        self.order = order
        self.rng = random.Random(seed)
        self.next = 0
        for w in writers:
            w.limit = limit

    def choices(self, idx: int, count: int) -> bytes:
        """The channels of the packets ``idx`` .. ``idx + count - 1`` of one device, in
        the order they are queued (one byte each)."""
        n = len(self.writers)
        if self.order == "roundrobin":
            first = self.next % n
            self.next += count
            return _cycle(range(n), first, count)
        if self.order == "idx0-last":
            head = b""
            if idx == 0:  # idx 0 waits on channel 0, which sends it last
                head, count = b"\0", count - 1
            first = self.next % (n - 1)
            self.next += count
            return head + _cycle(range(1, n), first, count)
        return bytes(self.rng.randrange(n) for _ in range(count))

    def put(self, headers: Any, data: Any, idx: int, flags: int = 0) -> bytes:
        """Queue one packet on its channel; the channel chosen (one byte)."""
        choice = self.choices(idx, 1)
        headers.put(self.outboxes[choice[0]], data, idx, flags)
        return choice

    async def queued(self, choices: bytes) -> None:
        """Packets went to the channels in ``choices``: wake their writers, then wait
        until none of them holds more than its limit."""
        chosen = [self.writers[c] for c in set(choices)]
        for w in chosen:
            w.wake()
        for w in chosen:
            while not w.hold and w.outbox.queued_bytes > w.limit:
                await w.room.park()


def _cycle(values: range, first: int, count: int) -> bytes:
    """``count`` values of ``values`` from position ``first``, cycling."""
    pattern = _PATTERNS.get(values)
    if pattern is None or len(pattern) < first + count:
        pattern = bytes(values) * (-(-(first + count) // len(values)) + 1)
        _PATTERNS[values] = pattern
    return pattern[first : first + count]


#: `_cycle`'s patterns, by range: a chunk's channel choices are one slice of one of them.
_PATTERNS: dict[range, bytes] = {}


class _Pool:
    """The buffers a stream source is read into, each reused once no packet uses it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffers: list[Any] = []

    def get(self) -> Any:
        for buf in self.buffers:
            if not buf.busy:
                return buf
        buf = core.SendBuffer(self.size)
        self.buffers.append(buf)
        return buf


async def _produce(
    device: SendDevice,
    dispatcher: _Dispatcher,
    packet_size: int,
    endian: Endian,
    window: int,
    rng: random.Random,
    counts: dict[str, tuple[int, int]],
) -> None:
    source = device.source
    headers = core.PacketHeaders(device.idstr, device.instance, endian)
    await source.start()
    if dispatcher.order != "shuffle" and source.fills_buffers:
        nbytes, idx = await _produce_chunks(source, headers, dispatcher, packet_size)
    else:
        nbytes, idx = await _produce_packets(source, headers, dispatcher, packet_size, window, rng)
    blob = await source.config_blob()
    await dispatcher.queued(dispatcher.put(headers, blob, idx, VFIO_FLAG_CONFIG_STATE))
    await device.queued(counts, nbytes, idx + 1)


async def _produce_chunks(
    source: Source, headers: Any, dispatcher: _Dispatcher, packet_size: int
) -> tuple[int, int]:
    """A stream source: read into pooled buffers of whole packets, each spread over the
    channels in one call. Returns (data bytes, packets)."""
    size = packet_size * max(1, CHUNK // packet_size)
    pool = _Pool(size)
    nbytes = idx = 0
    while True:
        buf = pool.get()
        n = await source.read_into(memoryview(buf))
        if n:
            count = -(-n // packet_size)
            choices = dispatcher.choices(idx, count)
            headers.spread(buf, n, packet_size, idx, dispatcher.outboxes, choices)
            nbytes += n
            idx += count
            await dispatcher.queued(choices)
        if n < size:  # a short read is the end of the stream
            return nbytes, idx


async def _produce_packets(
    source: Source,
    headers: Any,
    dispatcher: _Dispatcher,
    packet_size: int,
    window: int,
    rng: random.Random,
) -> tuple[int, int]:
    """One read per packet (a device's reads are its packets; the shuffle order).
    Returns (data bytes, packets)."""
    nbytes = idx = 0
    pending: list[tuple[bytes | bytearray | memoryview, int]] = []
    batch = window if dispatcher.order == "shuffle" else 1

    async def flush() -> None:
        if dispatcher.order == "shuffle":
            rng.shuffle(pending)
        for data, i in pending:
            await dispatcher.queued(dispatcher.put(headers, data, i))
        pending.clear()

    while True:
        data = await source.read(packet_size)
        if not data:
            break
        pending.append((data, idx))
        nbytes += len(data)
        idx += 1
        if len(pending) >= batch:
            await flush()
    await flush()
    return nbytes, idx


async def send_migration(
    *,
    connect_to: list[str],
    channels: int,
    uuid: bytes,
    devices: list[SendDevice],
    packet_size: int = 1024 * 1024,
    order: str = "roundrobin",
    seed: int = 0,
    window: int = 16,
    endian: Endian = "be",
    channel_rate: float | None = None,
    channel_rates: Sequence[float | None] | None = None,
    link_rate: float | None = None,
    control: str | None = None,
    tls: ssl.SSLContext | None = None,
    precopy: Mapping[tuple[str, int], bytes] | None = None,
    precopy_options: PrecopyOptions | None = None,
    switchover: str = "switchover-start",
    control_timeout: float = 60.0,
    close_timeout: float = CLOSE_TIMEOUT,
    status: SendStatus | None = None,
) -> SendReport:
    """Send every device's state over ``channels`` channels, config packet last.

    Args:
        connect_to: addresses; channel i connects to ``connect_to[i % len(connect_to)]``.
        channel_rate: pace each channel to this many bytes per second (None: unpaced).
        channel_rates: per-channel overrides of ``channel_rate`` (e.g. one slow channel);
            entry i applies to channel i, None keeps ``channel_rate``.
        link_rate: pace all channels together to this many bytes per second.
        control: the receiver's control channel: hello, ``precopy`` data, then each
            device's precopy phase (``precopy_options``; sources with one, e.g. a VFIO
            device with PRE_COPY), then ``switchover`` (``switchover-start``, or
            ``data-complete`` per device) before any multifd data, as QEMU at
            switchover; then wait (``control_timeout``) for ``done`` (see
            `vfiomig.send._control`).
        tls: a client context for every data channel and a TCP control channel.
        close_timeout: after the last byte, how long the receiver may take to read each
            channel to its end and close it (see `vfiomig.send._close`).
        status: updated in place as the send goes on (a progress display reads it); its
            ``done`` is set when this returns or raises.

    Raises:
        UsageError: bad arguments.
        SendError: a channel could not connect, broke, or was not read to its end by the
            receiver (a refusal, a failed migration), or a source failed.
        SourceError: a device failed in its precopy phase.
        ReceiverFailed: the receiver reported a failure (with ``control``).

    On any failure (and on cancel) every source is aborted (a VFIO device goes back to
    RUNNING) before it is closed; sources are always closed.

    Success means the receiver took every byte: with ``control``, every device reported
    ``loaded``; without, every channel was read to its end and closed in order by the
    receiver (`vfiomig.send._close`).

    Cancellation: channels are reset; the receiver sees them break.
    """
    if order not in ORDERS:
        raise UsageError(f"order {order!r} is unknown (known: {', '.join(ORDERS)})")
    if not 1 <= channels <= 255:
        raise UsageError(f"channels {channels} is out of range (1 to 255)")
    if order == "idx0-last" and channels < 2:
        raise UsageError("order idx0-last needs at least 2 channels")
    if packet_size < 1:
        raise UsageError(f"packet size {packet_size} is too small")
    status = status if status is not None else SendStatus()
    cpu_start = time.process_time()
    multifd = partial(
        _send_channels,
        status=status,
        connect_to=connect_to,
        channels=channels,
        uuid=uuid,
        devices=devices,
        packet_size=packet_size,
        order=order,
        seed=seed,
        window=window,
        endian=endian,
        channel_rate=channel_rate,
        channel_rates=channel_rates,
        link_rate=link_rate,
        tls=tls,
        close_timeout=close_timeout,
    )
    try:
        if control is None:
            report = await multifd()
        else:
            report = await send_with_control(
                control,
                tls=tls,
                precopy=precopy or {},
                precopy_options=precopy_options or PrecopyOptions(),
                switchover=switchover,
                events_timeout=control_timeout,
                devices=devices,
                send=multifd,
                status=status,
            )
        return dataclasses.replace(report, cpu_seconds=time.process_time() - cpu_start)
    except BaseException:
        with trio.CancelScope(shield=True):
            for device in devices:
                with trio.move_on_after(ABORT_TIMEOUT):
                    await device.source.abort()
        raise
    finally:
        with trio.CancelScope(shield=True):
            for device in devices:
                await device.source.aclose()
        status.phase = "done"
        status.done.set()


async def _send_channels(
    *,
    connect_to: list[str],
    channels: int,
    uuid: bytes,
    devices: list[SendDevice],
    packet_size: int,
    order: str,
    seed: int,
    window: int,
    endian: Endian,
    channel_rate: float | None,
    channel_rates: Sequence[float | None] | None,
    link_rate: float | None,
    tls: ssl.SSLContext | None,
    status: SendStatus,
    close_timeout: float = CLOSE_TIMEOUT,
    on_failure: Callable[[SendError], Awaitable[None]] | None = None,
) -> SendReport:
    """The multifd data of every device (the sources are the caller's to close).

    ``on_failure`` runs, shielded, when the send failed (a source, a channel's connect,
    send or end), before the channels are reset: the control driver tells the receiver
    why before it sees them break, so that its error is the sender's cause, not a
    channel cut short.

    A channel ends in order (FIN) only after the receiver read it to its end; on any
    failure or cancel every channel is reset (SO_LINGER 0), whatever it still holds, so
    that the receiver never takes a cut stream for an orderly end: a FIN between two
    packets would read as the end of the channel, and one inside a packet as a sender
    that stopped mid-packet rather than one that failed elsewhere.
    """
    addresses = [parse_address(a) for a in connect_to]
    status.phase = "connecting"
    start = trio.current_time()
    writers: list[Writer] = []
    progress = Progress()
    rates = [channel_rate] * channels
    for i, override in enumerate((channel_rates or [])[:channels]):
        if override is not None:
            rates[i] = override
    link: Link | None = None
    failures: list[SendError] = []
    ended = False  # every channel was read to its end and closed by the receiver
    try:
        for i in range(channels):
            addr = addresses[i % len(addresses)]
            try:
                stream: trio.abc.Stream = await connect(addr)
            except OSError as exc:
                raise SendError(f"channel {i}: cannot connect to {addr}: {describe(exc)}") from exc
            tune_socket(stream)
            if tls is not None:
                # Over unix: the receiver's certificate must name localhost.
                host = addr.host if addr.kind == "tcp" else "localhost"
                stream = trio.SSLStream(stream, tls, server_hostname=host)
            hold = order == "idx0-last" and i == 0
            writers.append(Writer(stream, rates[i], progress, hold, status))
            status.channels += 1
            try:  # under TLS, the handshake happens here
                await stream.send_all(encode_handshake(uuid, i))
            except (OSError, trio.BrokenResourceError) as exc:
                raise channel_error(i, 0, exc, tls=tls is not None) from exc
        if link_rate:
            link = Link(link_rate)
            for writer in writers:
                writer.link = link
        chunk = packet_size * max(1, CHUNK // packet_size)
        limit = max(CHANNEL_QUEUE * (core.PACKET_HEADER_SIZE + packet_size), chunk)
        status.phase = "stop-copy"
        counts: dict[str, tuple[int, int]] = {}
        modes = native_streams(
            devices, writers, order=order, linked=link is not None, tls=tls is not None
        )
        if modes is not None:  # C threads send (send/_threads.py)
            await send_threaded(
                devices,
                modes,
                writers,
                packet_size=packet_size,
                chunk=chunk,
                limit=limit,
                endian=endian,
                status=status,
                counts=counts,
                failures=failures,
            )
        else:
            dispatcher = _Dispatcher(writers, order, seed, limit)
            await _send_trio(
                dispatcher, devices, failures, counts, packet_size, endian, window, seed
            )
        if failures:
            raise failures[0]
        # Every byte is sent; success only once the receiver read each channel to its end.
        status.phase = "waiting for the receiver"
        await end_channels([w.stream for w in writers], [w.sent for w in writers], close_timeout)
        ended = True
    except SendError as exc:
        if on_failure is not None:
            with trio.CancelScope(shield=True):
                await on_failure(exc)  # before the channels break
        raise
    finally:
        with trio.CancelScope(shield=True):
            for writer in writers:
                if ended:
                    await writer.stream.aclose()
                else:  # failed or cancelled: reset, never an orderly end (see above)
                    reset_on_close(writer.stream)
                    await trio.aclose_forcefully(writer.stream)
        status.channels = 0
    total = sum(b for b, _ in counts.values())
    packets = sum(p for _, p in counts.values())
    return SendReport(
        total, packets, trio.current_time() - start, counts, tuple(w.sent for w in writers)
    )


async def _send_trio(
    dispatcher: _Dispatcher,
    devices: list[SendDevice],
    failures: list[SendError],
    counts: dict[str, tuple[int, int]],
    packet_size: int,
    endian: Endian,
    window: int,
    seed: int,
) -> None:
    """The trio sender: a producer task per device, a writer task per channel."""
    writers = dispatcher.writers
    async with trio.open_nursery() as nursery:
        scope = nursery.cancel_scope
        for i, writer in enumerate(writers):
            nursery.start_soon(writer.run, i, failures, scope)
        async with trio.open_nursery() as producers:
            for n, device in enumerate(devices):
                rng = random.Random(seed * 7919 + n)
                producers.start_soon(
                    _produce_guarded,
                    failures,
                    scope,
                    device,
                    dispatcher,
                    packet_size,
                    endian,
                    window,
                    rng,
                    counts,
                )
        for writer in writers:
            writer.close()
