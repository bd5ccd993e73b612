"""The C send path: sources read and sent by threads, no interpreter per chunk.

When nothing needs the trio sender's per-packet decisions, the multifd data goes through
`vfiomig._core.SendJob`, a thread per channel building the packets' headers and writing
them with one ``sendmsg`` per batch, waiting with ``poll`` when the socket is full. Each
device comes to it in one of two ways:

- a stream the C core reads itself (`Source.native_stream`, asked after ``start``:
  ``synth:``, ``file:``, ``fd:``, a kernel VFIO device's STOP_COPY data fd, and a
  ``vfio-user:`` client's socket in STOP_COPY, whose MIG_DATA_READ replies the reader
  receives straight into its chunks, native/vfiomig_sendvu.c and
  `vfiomig.vfio_user.client._native_read`): a reader
  thread per device reads it into pooled chunks of whole packets (the trio sender's
  `CHUNK`) and queues the packets in QEMU's round robin (one ``synth:`` or pattern device
  needs no reader: each channel's thread makes its own share of the round robin, as
  ``cref_send``'s do, kept within the channels' limits of each other;
  ``VFIOMIG_SEND_DIRECT=0``: fed by a reader all the same);
- any other source that does not fill buffers (a device whose reads are its packets: a
  VFIO device read through an injected function, a ``vfio-user:`` client that is not
  idle once started) is pushed: a
  task here reads it with ``read`` (a chunk of whole packets at a time when its reads
  fill what they are asked for, `Source.fills_reads`, else a packet; a vfio-user reply's
  data is a view of the buffer it was received in) and hands each read to the job, which
  cuts it into packets, queues them in the same round robin and holds the buffer until
  the channels' threads sent them. After each read the task waits, as a reader thread
  does, while a channel it used holds more than the limit: on the device's room
  eventfd, an awaitable wait in the event loop (`SendJob.room`), never a blocking one.

The bytes on every channel are those of the trio sender (tests/integration/
test_send_wire.py), and so is the backpressure: a reader waits while a channel it used holds
more than the same limit. Zero-copy where it pays (native/vfiomig_sendzc.c,
`zerocopy_mode`): a regular file's packets go with ``sendfile`` after their header, a pipe's
(a socket's only when forced) are spliced into a pipe per channel by the reader and from
there into the socket; a file that shrinks while it is sent fails its device (kind
``short``), not garbage.

This task starts the job, runs the push tasks, waits for its descriptor (readable once the
threads are done) and copies its counters into the `SendStatus` now and then. A cancel
(SIGTERM, a failure elsewhere) cancels the job, whose threads wake from any wait at once
(from a blocking send within its 100 ms ``SO_SNDTIMEO``; a reader blocked in a VFIO device's
read ends that read first, see `vfiomig.vfio._source`; a vfio-user reader first collects the
replies its device owes, within one reply timeout, so that the client can still SET
RUNNING), waits for the job's descriptor (shielded: that server may be served by this event
loop) and joins them before it returns: no thread outlives the call. Each source read by a
reader then takes its stream back (`Source.native_joined`: a vfio-user client, broken unless
the reader left it in step). A source's failure names the device, the cause and how far it
got; the device is put back (`Source.native_failed`, then `abort`).

Pacing per channel (``channel_rate``, ``channel_rates``) is the threads' too: each paces
its own channel as the trio sender's `Writer` does (a packet leaves once the channel's
link model could have carried it, those due together in one ``sendmsg``, a sleep of the
head's time plus 1 ms otherwise, which the cancel eventfd ends).

The trio sender stays, chosen automatically, for what the threads do not do: the pure
core, TLS, a link shared by every channel (``link_rate``), every order but
``roundrobin``, a stream source the C core cannot read, a stream that is not a socket;
and when ``VFIOMIG_SEND_THREADS=0`` (comparisons, tests).
"""

from __future__ import annotations

import errno as errno_module
import logging
import os
from collections.abc import Sequence
from typing import Any

import trio

from vfiomig import _core as core
from vfiomig._core._errors import VfioMigError, os_error_text
from vfiomig._core._wire import Endian
from vfiomig._logs import event
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
) -> list[str] | None:
    """How the C send path takes each device (``"stream"``: `Source.native_stream` once
    started; ``"push"``: read here and pushed) when it can carry this send (``linked``:
    the channels share one paced link, which only the trio sender models);
    None when the trio sender must."""
    if (
        getattr(core, "SendJob", None) is None
        or os.environ.get("VFIOMIG_SEND_THREADS") == "0"
        or order != "roundrobin"
        or linked
        or tls
        or any(w.sock is None for w in writers)
        or not devices
    ):
        return None
    modes = []
    for device in devices:
        if device.source.streams_natively():
            modes.append("stream")
        elif not device.source.fills_buffers:
            modes.append("push")
        else:  # its read_into's buffers are the trio sender's chunks
            return None
    return modes


async def send_threaded(
    devices: Sequence[SendDevice],
    modes: Sequence[str],
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
    """Send every device over the writers' sockets with a `SendJob`; a failure goes to
    ``failures`` (one, naming the channel or the device and the cause)."""
    specs: list[tuple[str, int, str, tuple[object, ...], bytes]] = []
    modes = list(modes)
    for d, device in enumerate(devices):
        mode = modes[d]
        try:
            await device.source.start()
            stream = device.source.native_stream() if mode == "stream" else ("push",)
            if stream is None and not device.source.fills_buffers:
                # a device whose reads are its packets (a vfio-user client that is not
                # idle once started): read here and pushed, as before
                stream, mode = ("push",), "push"
                modes[d] = mode
            if stream is None:
                raise SendError(
                    f"{device.name}: source {device.source.description} cannot be read by"
                    " the C send path after all (it said it could before it started)"
                )
            blob = await device.source.config_blob() if mode == "stream" else b""
        except SendError:
            raise
        except (OSError, VfioMigError) as exc:  # as the trio sender's producer says it
            failures.append(device.read_failed(exc))
            return
        specs.append((device.idstr, device.instance, endian, stream, blob))
        log.info(
            "%s: sent from C threads (%s)",
            device.name,
            "its reader thread reads the source" if mode == "stream" else "read here, pushed",
            extra=event("send_threads", device.name, mode=mode),
        )
    fds = [w.sock.fileno() for w in writers if w.sock is not None]
    direct = _direct()
    rates = [w.rate or 0.0 for w in writers]  # channel_rate(s): each thread paces itself
    job = core.SendJob(
        fds,
        packet_size,
        chunk,
        limit,
        specs,
        direct=direct,
        rates=rates,
        zerocopy=zerocopy_mode(),
    )
    base = status.sent_bytes
    job.start()
    try:
        async with trio.open_nursery() as nursery:
            for d, mode in enumerate(modes):
                if mode == "push":
                    size = chunk if devices[d].source.fills_reads else packet_size
                    nursery.start_soon(_push, job, d, devices[d], size, failures)
            while not job.finished:
                with trio.move_on_after(PROGRESS_EVERY):
                    await trio.lowlevel.wait_readable(job)
                _copy_counters(job, writers, status, base)
            # Done: a push task still reading (the job failed under it) stops now, not
            # when its device answers; after a success every one has returned already.
            nursery.cancel_scope.cancel()
    finally:
        if not job.finished:
            job.cancel()  # a thread sees it at once, or within 100 ms in a send
            # ... but a vfio-user reader first collects the replies its device still owes
            # (within its reply timeout), maybe from a server this very event loop runs:
            # waited for here, not in the blocking join.
            with trio.CancelScope(shield=True):
                while not job.finished:
                    await trio.lowlevel.wait_readable(job)
        job.join()
        for d, mode in enumerate(modes):
            if mode == "stream":  # a source sharing its stream's connection takes it back
                devices[d].source.native_joined(job.source_detail(d))
        _copy_counters(job, writers, status, base)
    if failures:  # a pushed source's failure (the job was cancelled after it)
        return
    error = job.error
    if error is not None:
        failures.append(await _failure(error, devices))
        return
    for device, (nbytes, packets) in zip(devices, job.device_counts, strict=True):
        await device.queued(counts, nbytes, packets)


async def _push(job: Any, d: int, device: SendDevice, size: int, failures: list[SendError]) -> None:
    """Read device ``d`` ``size`` bytes at a time (a chunk of whole packets when its reads
    fill what they are asked for, `Source.fills_reads`: the packets of a read per packet;
    a packet otherwise) and push each read to the job, then its config blob. A source
    failure is recorded and cancels the job; a job that failed (its own error says why)
    ends the reading."""
    source = device.source
    room_fd = job.room_fileno(d)
    try:
        while True:
            data = await source.read(size)
            if not data:
                break
            if not job.push(d, data):
                return
            while not job.room(d):
                await trio.lowlevel.wait_readable(room_fd)
        job.push_end(d, await source.config_blob())
    except (OSError, VfioMigError) as exc:
        failures.append(device.read_failed(exc))
        job.cancel()


def _direct() -> bool:
    """Whether to let `SendJob` run without a reader when it can (one ``synth:`` or
    pattern device): yes, unless ``VFIOMIG_SEND_DIRECT=0``. Quiet A/B runs
    (benchmarks/README.md, round 5), once the direct channels were kept in step: as fast
    as the reader-fed ones at 4 KiB, 64 KiB and 1 MiB x 4 and cheaper (4 KiB: 0.63
    against 0.78 CPU s/GiB). Before that they drifted apart, and lost by rate below
    1 MiB (round 4), which is why they were used only from 1 MiB packets up then."""
    return os.environ.get("VFIOMIG_SEND_DIRECT") != "0"


def zerocopy_mode() -> int:
    """`SendJob`'s zerocopy: ``VFIOMIG_SEND_ZEROCOPY`` 0 (never: copied as before), 2
    (always, whatever the packet size and a socket source too: for tests and
    measurements), else 1 (sendfile and splice for packets of at least 64 KiB from a file,
    128 KiB from a pipe: where they pay, measured)."""
    value = os.environ.get("VFIOMIG_SEND_ZEROCOPY", "1")
    return {"0": 0, "2": 2}.get(value, 1)


def _copy_counters(job: object, writers: Sequence[Writer], status: SendStatus, base: int) -> None:
    sent = job.channel_bytes  # type: ignore[attr-defined]
    for writer, n in zip(writers, sent, strict=True):
        writer.sent = n
    status.sent_bytes = base + sum(sent)


async def _failure(error: tuple[str, int, int, int], devices: Sequence[SendDevice]) -> SendError:
    kind, who, errno, sent = error
    cause = OSError(errno, os.strerror(errno))
    if kind == "channel":
        return channel_error(who, sent, cause)
    if kind == "source":  # ``sent``: the bytes read before the failure
        device = devices[who]
        return device.read_failed(await device.source.native_failed(cause, sent))
    if kind == "short":  # sendfile or a read met the file's end: it shrank while sent
        cause = OSError(errno_module.ENODATA, "the file is shorter than when the send began")
        text = f"the file ended at byte {sent}, shorter than when the send began"
        return devices[who].source_failed(text, cause)
    # "start": a thread could not be made ("cancelled" comes only from our own cancel,
    # which a trio cancellation follows out of this call).
    return SendError(f"cannot start the send threads: {os_error_text(cause)}")
