"""The C send path: stream sources read and sent by threads, no interpreter per chunk.

When every source can be read by the C core itself (`Source.native_stream`: ``synth:``,
``file:``, ``fd:``) and nothing needs the trio sender's per-packet decisions, the multifd
data goes through `vfiomig._core.SendJob`: a reader thread per device reads its source
into pooled chunks of whole packets (the trio sender's `CHUNK`) and queues the packets in
QEMU's round robin; a thread per channel builds their headers and writes them with one
``sendmsg`` per batch, waiting with ``poll`` when the socket is full. One device whose
bytes are known by offset (``synth:``, bench's pattern) needs no reader: each channel's
thread makes its own share of the round robin and sends it, as ``cref_send`` does (no
queue, no wakeup between threads; ``VFIOMIG_SEND_DIRECT=0`` keeps the reader, for
comparisons and tests). The bytes on every
channel are those of the trio sender (tests/integration/test_send_wire.py), and so is the
backpressure: a reader waits while a channel it used holds more than the same limit.

This task only starts the job, waits for its descriptor (readable once the threads are
done) and copies its counters into the `SendStatus` now and then. A cancel (SIGTERM, a
failure elsewhere) cancels the job, whose threads wake from any wait at once (from a
blocking send within its 100 ms ``SO_SNDTIMEO``), and joins them before it returns: no
thread outlives the call.

Pacing per channel (``channel_rate``, ``channel_rates``) is the threads' too: each paces
its own channel as the trio sender's `Writer` does (a packet leaves once the channel's
link model could have carried it, those due together in one ``sendmsg``, a sleep of the
head's time plus 1 ms otherwise, which the cancel eventfd ends).

The trio sender stays, chosen automatically, for what the threads do not do: the pure
core, TLS, a link shared by every channel (``link_rate``), every order but
``roundrobin``, device sources, a stream that is not a socket; and when
``VFIOMIG_SEND_THREADS=0`` (comparisons, tests).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import trio

from vfiomig import _core as core
from vfiomig._core._errors import os_error_text
from vfiomig._core._wire import Endian
from vfiomig.send._channel import Writer
from vfiomig.send._close import channel_error
from vfiomig.send._types import SendDevice, SendError, SendStatus

log = logging.getLogger("vfiomig")

#: How often the waiting task copies the threads' counters into the status (seconds).
PROGRESS_EVERY = 0.25


def native_streams(
    devices: Sequence[SendDevice],
    writers: Sequence[Writer],
    *,
    order: str,
    linked: bool,
    tls: bool,
) -> list[tuple[object, ...]] | None:
    """Each device's `Source.native_stream` when the C send path can carry this send
    (``linked``: the channels share one paced link, which only the trio sender models);
    None when the trio sender must."""
    if (
        getattr(core, "SendJob", None) is None
        or os.environ.get("VFIOMIG_SEND_THREADS") == "0"
        or order != "roundrobin"
        or linked
        or tls
        or any(w.sock is None for w in writers)
    ):
        return None
    streams = [d.source.native_stream() for d in devices]
    if not devices or any(s is None for s in streams):
        return None
    return [s for s in streams if s is not None]


async def send_threaded(
    devices: Sequence[SendDevice],
    streams: Sequence[tuple[object, ...]],
    writers: Sequence[Writer],
    *,
    packet_size: int,
    chunk: int,
    limit: int,
    endian: Endian,
    status: SendStatus,
    counts: dict[str, tuple[int, int]],
    failures: list[SendError],
) -> None:
    """Send every device's stream over the writers' sockets with a `SendJob`; a failure
    goes to ``failures`` (one, naming the channel or the device and the cause)."""
    specs = []
    for device, stream in zip(devices, streams, strict=True):
        await device.source.start()
        blob = await device.source.config_blob()
        specs.append((device.idstr, device.instance, endian, stream, blob))
    fds = [w.sock.fileno() for w in writers if w.sock is not None]
    direct = os.environ.get("VFIOMIG_SEND_DIRECT") != "0"
    rates = [w.rate or 0.0 for w in writers]  # channel_rate(s): each thread paces itself
    job = core.SendJob(fds, packet_size, chunk, limit, specs, direct=direct, rates=rates)
    base = status.sent_bytes
    job.start()
    try:
        while not job.finished:
            with trio.move_on_after(PROGRESS_EVERY):
                await trio.lowlevel.wait_readable(job)
            _copy_counters(job, writers, status, base)
    finally:
        if not job.finished:
            job.cancel()  # a thread sees it at once, or within 100 ms in a send: short join
        job.join()
        _copy_counters(job, writers, status, base)
    error = job.error
    if error is not None:
        failures.append(_failure(error, devices))
        return
    for device, (nbytes, packets) in zip(devices, job.device_counts, strict=True):
        await device.queued(counts, nbytes, packets)


def _copy_counters(job: object, writers: Sequence[Writer], status: SendStatus, base: int) -> None:
    sent = job.channel_bytes  # type: ignore[attr-defined]
    for writer, n in zip(writers, sent, strict=True):
        writer.sent = n
    status.sent_bytes = base + sum(sent)


def _failure(error: tuple[str, int, int, int], devices: Sequence[SendDevice]) -> SendError:
    kind, who, errno, sent = error
    cause = OSError(errno, os.strerror(errno))
    if kind == "channel":
        return channel_error(who, sent, cause)
    if kind == "source":
        return devices[who].source_failed(os_error_text(cause), cause)
    # "start": a thread could not be made ("cancelled" comes only from our own cancel,
    # which a trio cancellation follows out of this call).
    return SendError(f"cannot start the send threads: {os_error_text(cause)}")
