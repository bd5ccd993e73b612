"""The precopy phase of one device: its state sent ahead while it still runs.

QEMU does the same for a VFIO device with PRE_COPY (``vfio_save_iterate``): while the VM
runs it reads the device's data fd and sends it on the main channel, watching
VFIO_MIG_GET_PRECOPY_INFO, and switches over once what is left is small enough; only that
rest is read while the VM is stopped, which is what the downtime pays for.

Here each round asks the source what is pending (initial + dirty bytes), then reads at
most that much (less at the temporary end of the data; a source that cannot say, such as
a vfio-user device, reads to the temporary end and is judged by what its last round
gave) and sends it as ``precopy``
messages on the control channel, which the receiver writes to the device before any
multifd data (SPEC §2, §3). The phase ends when at most ``threshold`` bytes are pending,
after ``rounds`` rounds, or when a round leaves more pending than the round before (the
device dirties faster than it is read: more rounds would not shorten the downtime).
"""

from __future__ import annotations

import logging

import trio

from vfiomig._core._errors import os_error_text
from vfiomig.control import ControlClient
from vfiomig.send._types import PrecopyOptions, PrecopyReport, SendDevice, SendError

log = logging.getLogger("vfiomig")

#: The most one round reads from a device that does not report its pending bytes (it
#: reads to the temporary end of the data otherwise): a device that produces data as
#: fast as it is read cannot hold the phase forever.
UNREPORTED_ROUND_CAP = 1 << 30


async def run_precopy(
    ctl: ControlClient, device: SendDevice, options: PrecopyOptions
) -> PrecopyReport | None:
    """Run ``device``'s precopy phase; None when its source has none.

    Raises:
        SendError: the control channel broke (the receiver went away).
        SourceError: the device failed (it was returned to RUNNING).

    Cancellation: stops between two reads; the source is left in its precopy phase (the
    sender's abort returns the device to RUNNING).
    """
    source = device.source
    if options.rounds <= 0 or not await source.start_precopy():
        return None
    rounds = sent = 0
    history: list[int] = []  # pending at each round's start; unreported: each round's bytes
    while True:
        info = await source.precopy_info()
        if info is not None:
            pending: int | None = info.pending
            before = history[-1] if history else None
        else:  # judged by what the last round gave, against the round before it
            pending = history[-1] if history else None
            before = history[-2] if len(history) > 1 else None
        if pending is not None and pending <= options.threshold:
            stopped = "converged"
        elif rounds >= options.rounds:
            stopped = "round limit"
        elif before is not None and pending is not None and pending > before:
            stopped = "not converging"
        else:
            budget = UNREPORTED_ROUND_CAP if info is None else info.pending
            got = await _round(ctl, device, options.chunk, budget)
            history.append(got if info is None else info.pending)
            sent += got
            rounds += 1
            continue
        if info is not None:
            history.append(info.pending)
        break
    log_ = log.warning if stopped != "converged" else log.info
    log_(
        "%s: precopy %s after %d rounds: %d bytes sent, %d pending (threshold %d)",
        device.name,
        stopped,
        rounds,
        sent,
        -1 if pending is None else pending,
        options.threshold,
    )
    return PrecopyReport(rounds, sent, tuple(history), stopped)


async def _round(ctl: ControlClient, device: SendDevice, chunk: int, budget: int) -> int:
    """Read and send up to ``budget`` bytes (a device that keeps producing data cannot
    hold a round forever); returns the bytes sent."""
    sent = 0
    while sent < budget:
        data = await device.source.read_precopy(min(chunk, budget - sent))
        if not data:
            break
        try:
            await ctl.precopy(device.idstr, device.instance, data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SendError(
                f"{device.name}: control channel: sending precopy data failed at byte "
                f"{sent} of this round: {os_error_text(exc) or type(exc).__name__}"
            ) from exc
        sent += len(data)
    return sent
