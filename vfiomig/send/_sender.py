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

The sender streams: it holds at most a few packets per channel, never the whole state.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any

import trio

from vfiomig._core._errors import UsageError, VfioMigError
from vfiomig._core._wire import (
    VFIO_FLAG_CONFIG_STATE,
    Endian,
    encode_device_header,
    encode_handshake,
    encode_vfio_header,
)
from vfiomig._logs import event
from vfiomig.send._close import CLOSE_TIMEOUT, channel_error, describe, end_channels
from vfiomig.send._control import send_with_control
from vfiomig.send._types import (
    PrecopyOptions,
    SendDevice,
    SendError,
    SendReport,
    SendStatus,
    SourceFailed,
)
from vfiomig.transport import connect, parse_address, tune_socket

log = logging.getLogger("vfiomig")

ORDERS = ("roundrobin", "random", "shuffle", "idx0-last")

#: Packets queued per channel writer before a producer waits.
CHANNEL_QUEUE = 4
#: idx0-last: a channel stuck in one send this long counts as blocked by the receiver.
BLOCKED_AFTER = 0.3
#: The longest a source's abort (its device back to running) may take after a failure.
ABORT_TIMEOUT = 10.0


_Packet = tuple[bytes, bytes | bytearray | memoryview]  # (multifd + VFIO header, data)


class _Progress:
    """Sends completed by the channels other than a held one (idx0-last)."""

    def __init__(self) -> None:
        self.count = 0
        self.open = 0


class _Link:
    """The shared link of a total rate: every channel's bytes count against it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = trio.current_time()
        self.sent = 0


async def _produce_guarded(
    failures: list[SendError], scope: trio.CancelScope, device: SendDevice, *args: Any
) -> None:
    try:
        await _produce(device, *args)
    except trio.BrokenResourceError:
        # A channel writer failed and closed its queue; it recorded why.
        scope.cancel()
    except (OSError, VfioMigError) as exc:
        if isinstance(exc, SendError):
            failures.append(exc)
        else:
            cause = str(exc) if isinstance(exc, VfioMigError) else describe(exc)
            failure = SourceFailed(
                f"{device.name}: reading source {device.source.description} failed: {cause}"
            )
            failure.__cause__ = exc
            failures.append(failure)
        scope.cancel()


class _Writer:
    """One channel: a queue of packets and the task that sends them in queue order.

    A writer with ``hold`` set sends nothing until the other channels have all finished
    or made no progress for `BLOCKED_AFTER` seconds (blocked by the receiver).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        rate: float | None,
        progress: _Progress,
        hold: bool,
        status: SendStatus,
        link: _Link | None = None,
    ) -> None:
        self.stream = stream
        size = float("inf") if hold else CHANNEL_QUEUE
        self.send, self.receive = trio.open_memory_channel[_Packet](size)
        self.rate = rate
        self.link = link
        self.sent = 0
        self.progress = progress
        self.hold = hold
        self.status = status

    async def run(self, channel: int, failures: list[SendError], scope: trio.CancelScope) -> None:
        if self.hold:
            await self._wait_for_others()
        else:
            self.progress.open += 1
        try:
            await self._send_queue()
        except (OSError, trio.BrokenResourceError) as exc:
            tls = isinstance(self.stream, trio.SSLStream)
            failures.append(channel_error(channel, self.sent, exc, tls=tls))
            scope.cancel()
        finally:
            if not self.hold:
                self.progress.open -= 1

    async def _wait_for_others(self) -> None:
        last, since = -1, trio.current_time()
        while self.progress.open or last < 0:
            await trio.sleep(BLOCKED_AFTER / 6)
            now = trio.current_time()
            if self.progress.count != last:
                last, since = self.progress.count, now
            elif now - since >= BLOCKED_AFTER:
                return

    async def _send_queue(self) -> None:
        start = trio.current_time()
        link = self.link
        status = self.status
        async with self.receive:
            async for header, data in self.receive:
                # Pace to the link model before sending: a packet leaves once the link
                # could have carried it, so no channel is ever ahead of rate * elapsed
                # and the receiver cannot beat bytes / rate.
                n = len(header) + len(data)
                self.sent += n
                if self.rate:
                    await trio.sleep_until(start + self.sent / self.rate)
                if link is not None:
                    link.sent += n
                    await trio.sleep_until(link.start + link.sent / link.rate)
                await self.stream.send_all(header)
                if data:
                    await self.stream.send_all(data)
                status.sent_bytes += n
                if not self.hold:
                    self.progress.count += 1
        self.done = True


class _Dispatcher:
    """Chooses the channel of each packet according to the order."""

    def __init__(self, writers: list[_Writer], order: str, seed: int) -> None:
        self.writers = writers
        self.order = order
        self.rng = random.Random(seed)
        self.next = 0
        self.held: list[_Packet] = []  # idx0-last: idx 0 packets, sent last on channel 0

    async def dispatch(self, packet: _Packet, idx: int) -> None:
        writers = self.writers
        if self.order == "idx0-last":
            if idx == 0:
                await writers[0].send.send(packet)
                return
            choice = 1 + self.next % (len(writers) - 1)
            self.next += 1
        elif self.order == "roundrobin":
            choice = self.next % len(writers)
            self.next += 1
        else:
            choice = self.rng.randrange(len(writers))
        await writers[choice].send.send(packet)


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
    idx = 0
    nbytes = 0
    pending: list[tuple[_Packet, int]] = []

    def packet(idx: int, flags: int, data: bytes | bytearray | memoryview) -> _Packet:
        header = encode_device_header(device.idstr, device.instance, 12 + len(data))
        return header + encode_vfio_header(idx, flags, endian=endian), data

    async def flush() -> None:
        if dispatcher.order == "shuffle":
            rng.shuffle(pending)
        for item, i in pending:
            await dispatcher.dispatch(item, i)
        pending.clear()

    await source.start()
    while True:
        data = await source.read(packet_size)
        if not data:
            break
        pending.append((packet(idx, 0, data), idx))
        nbytes += len(data)
        idx += 1
        if len(pending) >= (window if dispatcher.order == "shuffle" else 1):
            await flush()
    await flush()
    blob = await source.config_blob()
    await dispatcher.dispatch(packet(idx, VFIO_FLAG_CONFIG_STATE, blob), idx)
    await source.finish()
    counts[device.name] = (nbytes, idx + 1)
    log.info(
        "%s: queued %d bytes in %d packets",
        device.name,
        nbytes,
        idx + 1,
        extra=event("send_device_queued", device.name, bytes=nbytes, packets=idx + 1),
    )


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

    Cancellation: channels are closed; the receiver sees them end inside a packet.
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
            return await multifd()
        return await send_with_control(
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
    on_source_failure: Callable[[SourceFailed], Awaitable[None]] | None = None,
) -> SendReport:
    """The multifd data of every device (the sources are the caller's to close).

    ``on_source_failure`` runs, shielded, when a source failed, before the channels are
    closed (the control driver tells the receiver why before it sees them end).
    """
    addresses = [parse_address(a) for a in connect_to]
    status.phase = "connecting"
    start = trio.current_time()
    writers: list[_Writer] = []
    progress = _Progress()
    rates = [channel_rate] * channels
    for i, override in enumerate((channel_rates or [])[:channels]):
        if override is not None:
            rates[i] = override
    link: _Link | None = None
    failures: list[SendError] = []
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
            writers.append(_Writer(stream, rates[i], progress, hold, status))
            status.channels += 1
            try:  # under TLS, the handshake happens here
                await stream.send_all(encode_handshake(uuid, i))
            except (OSError, trio.BrokenResourceError) as exc:
                raise channel_error(i, 0, exc, tls=tls is not None) from exc
        if link_rate:
            link = _Link(link_rate)
            for writer in writers:
                writer.link = link
        dispatcher = _Dispatcher(writers, order, seed)
        status.phase = "stop-copy"
        counts: dict[str, tuple[int, int]] = {}
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
                await writer.send.aclose()
        if failures:
            if isinstance(failures[0], SourceFailed) and on_source_failure is not None:
                with trio.CancelScope(shield=True):
                    await on_source_failure(failures[0])  # before the channels end
            raise failures[0]
        # Every byte is sent; success only once the receiver read each channel to its end.
        status.phase = "waiting for the receiver"
        await end_channels([w.stream for w in writers], [w.sent for w in writers], close_timeout)
    finally:
        with trio.CancelScope(shield=True):
            for writer in writers:
                await writer.stream.aclose()
        status.channels = 0
    total = sum(b for b, _ in counts.values())
    packets = sum(p for _, p in counts.values())
    return SendReport(
        total, packets, trio.current_time() - start, counts, tuple(w.sent for w in writers)
    )
