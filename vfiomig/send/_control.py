"""The source side of the control channel for ``vfiomig send --control``.

The order is QEMU's at switchover: ``hello``; the precopy (main-channel) data: given
blobs, then each device's precopy phase (`vfiomig.send._precopy`, while the device still
runs); then ``switchover-start`` (or ``data-complete`` for each device) *before* the multifd data, so
that the receiver's gate is open while the data arrives (a receiver with a closed gate
parks its channels once its budget is full, and the data could never all be sent); then
the multifd data; then the receiver's events until ``done``.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from vfiomig import _logs
from vfiomig._core._errors import UsageError, VfioMigError
from vfiomig.control import ControlClient, open_control_client
from vfiomig.send._precopy import precopy_phase
from vfiomig.send._types import (
    PrecopyOptions,
    SendDevice,
    SendReport,
    SendStatus,
    SourceFailed,
)

log = logging.getLogger("vfiomig")

SWITCHOVERS = ("switchover-start", "data-complete")


class ReceiverFailed(VfioMigError):
    """The receiver reported ``done`` with ``ok`` false (its errors are in the message)."""


async def send_with_control(
    address: str,
    *,
    tls: ssl.SSLContext | None,
    precopy: Mapping[tuple[str, int], bytes],
    precopy_options: PrecopyOptions,
    switchover: str,
    events_timeout: float,
    devices: Sequence[SendDevice],
    send: Callable[..., Awaitable[SendReport]],
    status: SendStatus,
) -> SendReport:
    """Drive the receiver's control channel around ``send(on_failure=...)`` (the multifd
    data; the hook sends ``abort`` with the sender's own failure, a source's or a
    channel's, before the channels break, so that the receiver fails at once and says why).

    Raises:
        ReceiverFailed: the receiver reported a failure.
        SendError: the control channel broke during the precopy phase.
        SourceError: a device failed during its precopy phase.
        VfioMigError: the control channel broke the protocol or no ``done`` came in time.
    """
    if switchover not in SWITCHOVERS:
        raise UsageError(f"switchover {switchover!r} is unknown (known: {', '.join(SWITCHOVERS)})")
    async with open_control_client(address, tls=tls) as ctl:
        info = await ctl.hello()
        log.info(
            "control: receiver has %s channels, devices %s",
            info["channels"],
            info["devices"],
            extra=_logs.event("control_hello", channels=info["channels"]),
        )
        try:
            status.phase = "precopy"
            phases, early = await precopy_phase(
                ctl, devices, precopy, precopy_options, status=status
            )
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, Exception) else "cancelled"
            await _tell_abort(ctl, f"sender failed in the precopy phase: {reason}")
            raise
        if switchover == "switchover-start":
            await ctl.switchover_start()
        else:
            for device in devices:
                await ctl.data_complete(device.idstr, device.instance)
        failure: BaseException | None = None
        report: SendReport | None = None
        try:
            report = await send(on_failure=lambda exc: _tell_abort(ctl, str(exc)))
        except Exception as exc:  # any failure (even a group): re-raised below
            # The receiver may have failed and closed the channels: its events say why.
            failure = exc
        status.phase = "waiting for the receiver"
        kept: list[dict[str, object]] = []
        ok: bool | None = None
        lost: str | None = None  # why the channel ended before ``done``
        with trio.move_on_after(events_timeout):
            while True:
                try:
                    event = early.pop(0) if early else await ctl.next_event()
                except (OSError, trio.BrokenResourceError) as exc:
                    lost = f"the connection broke ({exc})"
                    break
                if event is None:
                    lost = "the receiver closed it"
                    break
                kind = event["type"]
                if kind in ("loaded", "error", "done"):
                    kept.append(event)
                if kind == "loaded":
                    name = f"{event.get('device')}/{event.get('instance')}"
                    log.info("control: %s loaded", name, extra=_logs.event("receiver_loaded", name))
                elif kind == "error":
                    log.warning(
                        "control: receiver error: %s",
                        event.get("message"),
                        extra=_logs.event("receiver_error"),
                    )
                elif kind == "done":
                    ok = bool(event.get("ok"))
                    break
    if isinstance(failure, SourceFailed):
        raise failure  # the root cause; the receiver's errors follow from it
    if ok is False:
        errors = [str(e.get("message")) for e in kept if e["type"] == "error"]
        if failure is None:
            raise ReceiverFailed("receiver failed: " + ("; ".join(errors) or "no error given"))
        # Our own failure first (what this side saw: a channel reset, a timeout), then
        # the receiver's errors, less the echo of our abort.
        own = str(failure)
        theirs = [e for e in errors if own not in e]
        raise ReceiverFailed(
            f"{own}; receiver failed: " + ("; ".join(theirs) or "it aborted the migration")
        ) from failure
    if failure is not None:
        raise failure
    assert report is not None
    if ok is None and lost is not None:
        raise VfioMigError(
            f"control channel: {lost} before its done event: whether the devices loaded is unknown"
        )
    if ok is None:
        raise VfioMigError(f"receiver sent no done event within {events_timeout:g} s")
    return dataclasses.replace(report, control_events=tuple(kept), precopy=phases)


async def _tell_abort(ctl: ControlClient, reason: str) -> None:
    """Send ``abort`` so that the receiver fails at once with our reason; best effort (the
    channel may be gone), bounded, shielded (it runs on the way out of a failure)."""
    with trio.move_on_after(1, shield=True):
        try:
            await ctl.abort(reason)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
