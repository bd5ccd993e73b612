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

Flow control: the receiver queues precopy data until its device has written it, so the
sender keeps at most ``window`` bytes per device unwritten, as the receiver's
``progress`` events report them, and before switchover waits until all of it is written
(the device still runs: that wait costs no downtime, while data still queued at
switchover would). A receiver that writes nothing for ``stall`` seconds fails the phase.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from vfiomig._core._errors import VfioMigError, os_error_text
from vfiomig._logs import event
from vfiomig.control import ControlClient
from vfiomig.send._types import PrecopyOptions, PrecopyReport, SendDevice, SendError, SendStatus

log = logging.getLogger("vfiomig")

#: The most one round reads from a device that does not report its pending bytes (it
#: reads to the temporary end of the data otherwise): a device that produces data as
#: fast as it is read cannot hold the phase forever.
UNREPORTED_ROUND_CAP = 1 << 30


class Flow:
    """Precopy bytes sent and written (the receiver's ``progress`` events), per device.

    `read_events` is the only reader of the control channel during the phase; events other
    than ``progress`` are kept, in order, for the caller.
    """

    def __init__(self, options: PrecopyOptions, status: SendStatus) -> None:
        self.status = status
        self.window = options.window
        self.stall = options.stall
        self.sent: dict[tuple[str, int], int] = {}
        self.written: dict[tuple[str, int], int] = {}
        self.kept: list[dict[str, Any]] = []
        self.ended: str | None = None
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def read_events(self, ctl: ControlClient) -> None:
        """Until the receiver ends the session or closes the channel (or a cancel).

        A connection reset (a receiver that closed with our precopy data unread) ends
        the session like a close: the sending side reports the failure, never this task.
        """
        try:
            while (event := await ctl.next_event()) is not None:
                if event["type"] == "progress":
                    key = (str(event.get("device")), int(event.get("instance", 0)))
                    self.written[key] = int(event.get("written", 0))
                else:
                    self.kept.append(event)
                    if event["type"] == "done":
                        errors = [str(e.get("message")) for e in self.kept if e["type"] == "error"]
                        self.ended = "; ".join(errors) or "done without an error"
                        self._wake()
                        return
                self._wake()
            self.ended = "the receiver closed the control channel"
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = os_error_text(exc) or type(exc).__name__
            self.ended = f"the control channel broke: {cause}"
        self._wake()

    async def wait(self, device: SendDevice, unwritten: int) -> None:
        """Until at most ``unwritten`` precopy bytes of ``device`` are not yet written.

        Raises:
            SendError: the receiver ended the session, or wrote nothing for `stall` s.
        """
        key = (device.idstr, device.instance)
        while self.sent.get(key, 0) - self.written.get(key, 0) > unwritten:
            if self.ended is not None:
                raise SendError(f"{device.name}: receiver ended the session: {self.ended}")
            before = self.written.get(key, 0)
            with trio.move_on_after(self.stall):
                while self.written.get(key, 0) == before and self.ended is None:
                    await self._changed.wait()
            if self.written.get(key, 0) == before and self.ended is None:
                raise SendError(
                    f"{device.name}: receiver wrote no precopy data for {self.stall:g} s "
                    f"({before} of {self.sent[key]} bytes written)"
                )

    async def send(self, ctl: ControlClient, device: SendDevice, data: bytes) -> None:
        await self.wait(device, max(0, self.window - len(data)))
        key = (device.idstr, device.instance)
        try:
            await ctl.precopy(device.idstr, device.instance, data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SendError(
                f"{device.name}: control channel: sending precopy data failed after "
                f"{self.sent.get(key, 0)} bytes: {os_error_text(exc) or type(exc).__name__}"
            ) from exc
        self.sent[key] = self.sent.get(key, 0) + len(data)
        self.status.precopy_bytes += len(data)


async def precopy_phase(
    ctl: ControlClient,
    devices: Sequence[SendDevice],
    blobs: Mapping[tuple[str, int], bytes],
    options: PrecopyOptions,
    *,
    status: SendStatus,
) -> tuple[dict[str, PrecopyReport], list[dict[str, Any]]]:
    """Send the given precopy ``blobs``, run every device's precopy phase at once, then
    wait until the receiver wrote all of it. Returns each phase's report and the events
    (other than ``progress``) the receiver sent meanwhile.

    Raises:
        SendError: the control channel broke, or the receiver failed or stalled.
        SourceError: a device failed (it was returned to RUNNING).

    Cancellation: the phase stops; the caller's abort returns the devices to RUNNING.
    """
    flow = Flow(options, status)
    by_key = {(d.idstr, d.instance): d for d in devices}
    phases: dict[str, PrecopyReport] = {}
    failures: list[Exception] = []

    async def one(device: SendDevice, scope: trio.CancelScope) -> None:
        try:
            phase = await run_precopy(ctl, device, options, flow)
        except VfioMigError as exc:  # the first failure ends every device's phase
            failures.append(exc)
            scope.cancel()
            return
        if phase is not None:
            phases[device.name] = phase

    async with trio.open_nursery() as outer:
        outer.start_soon(flow.read_events, ctl)
        for (idstr, instance), data in blobs.items():
            device = by_key.get((idstr, instance))
            if device is None:  # not ours to pace: the receiver names it if it is unknown
                await ctl.precopy(idstr, instance, data)
            else:
                await flow.send(ctl, device, data)
        async with trio.open_nursery() as inner:
            for device in devices:
                inner.start_soon(one, device, inner.cancel_scope)
        if not failures:
            try:
                for key in flow.sent:
                    await flow.wait(by_key[key], 0)  # written before the device stops
            except SendError as exc:
                failures.append(exc)
        outer.cancel_scope.cancel()
    if failures:
        raise failures[0]
    return phases, flow.kept


async def run_precopy(
    ctl: ControlClient, device: SendDevice, options: PrecopyOptions, flow: Flow
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
            got = await _round(ctl, device, options.chunk, budget, flow)
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
        extra=event(
            "precopy_end", device.name, stopped=stopped, rounds=rounds, bytes=sent, pending=pending
        ),
    )
    return PrecopyReport(rounds, sent, tuple(history), stopped)


async def _round(
    ctl: ControlClient, device: SendDevice, chunk: int, budget: int, flow: Flow
) -> int:
    """Read and send up to ``budget`` bytes (a device that keeps producing data cannot
    hold a round forever); returns the bytes sent."""
    sent = 0
    while sent < budget:
        data = await device.source.read_precopy(min(chunk, budget - sent))
        if not data:
            break
        await flow.send(ctl, device, data)
        sent += len(data)
    return sent
