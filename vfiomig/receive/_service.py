"""The receive service: listeners, channel tasks, loaders and the stall watchdog in one
nursery. `serve_receiver` is the entry point for the command line and for libraries.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

import trio

from vfiomig._core import StallError, UsageError
from vfiomig._logs import event
from vfiomig.receive._channels import check_missing, run_channel
from vfiomig.receive._loader import run_loader
from vfiomig.receive._session import (
    Device,
    MigrationFailed,
    ReceiverConfig,
    Session,
    SessionReport,
)
from vfiomig.sinks import ConfigTarget
from vfiomig.transport import (
    Listener,
    MeteredStream,
    Pending,
    nonblocking_twin,
    open_listener,
    parse_address,
    peer_label,
    reset_on_close,
    tune_socket,
)

log = logging.getLogger("vfiomig")

#: A task run beside the session (the control channel, a signal handler): called as
#: ``await nursery.start(task, session)``; it must call ``task_status.started()``.
ExtraTask: TypeAlias = Callable[..., Awaitable[None]]

#: When every channel ended before all ``--channels`` had come, wait this long for the
#: rest before declaring the packets still missing lost.
LATE_CHANNEL_GRACE = 2.0
#: While no data channel came, a line says so this often (seconds; a quarter of the
#: first-channel timeout when that is shorter).
WAITING_LOG_INTERVAL = 60.0


async def serve_receiver(
    config: ReceiverConfig,
    *,
    task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED,
    extra_tasks: Sequence[ExtraTask] = (),
) -> SessionReport:
    """Receive one migration; return its report once every device is loaded.

    ``extra_tasks`` run in the session's nursery (see `ExtraTask`).
    ``task_status.started`` gets the `Session` (its ``bound`` attribute lists the real
    listening addresses) once every listener is up.

    Raises:
        MigrationFailed: a device failed; ``.report`` has every device's outcome.
        UsageError: a listener could not be opened, or the configuration is incomplete.

    Cancellation: cancelling aborts every sink not yet finished and closes every fd.
    """
    if config.channels < 1 or config.channels > 255:
        raise UsageError(f"channels {config.channels} is out of range (1 to 255)")
    if config.max_pending is not None and config.max_pending < 1:
        raise UsageError(f"max pending {config.max_pending} is below 1")
    session = Session(config)
    targets: dict[str, ConfigTarget] = {}
    for setup in config.devices:
        target = setup.config
        if target is None and config.config_target is not None:
            target = config.config_target(setup)
        if target is None:
            raise UsageError(f"{setup.name}: no config target (the config blob is never dropped)")
        targets[setup.name] = target
    listeners = []
    try:
        for text in config.listen:
            listener, bound = await open_listener(parse_address(text))
            listeners.append(listener)
            session.bound.append(str(bound))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        for setup in config.devices:
            await setup.sink.aclose()
        raise
    if config.gate == "open":
        session.open_all_gates()
    with session.cancel_scope:
        async with trio.open_nursery() as nursery:
            for device in session.devices.values():
                nursery.start_soon(run_loader, session, device, targets[device.name])
            for listener in listeners:
                nursery.start_soon(_accept_loop, session, listener, nursery)
            nursery.start_soon(_watchdog, session)
            for task in extra_tasks:
                await nursery.start(task, session)
            task_status.started(session)
            await session.done.wait()
            nursery.cancel_scope.cancel()
    report = session.report()
    if not report.ok:
        raise MigrationFailed(report)
    return report


async def _accept_loop(session: Session, listener: Listener, nursery: trio.Nursery) -> None:
    """Accept data connections until cancelled; a shortage of fds is waited out (see
    `vfiomig.transport.Admission`), never an error. Every connection accepted is pending
    (bounded, evicted when silent the longest) until its handshake is accepted."""
    admission = session.admission
    async with listener:
        with nonblocking_twin(listener) as twin:
            while True:
                # No await between the accepts and the tasks: a cancel loses no stream.
                for stream in await admission.accept_burst(listener, twin):
                    _start_channel(session, stream, nursery)


def _start_channel(session: Session, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
    admission = session.admission
    label = peer_label(stream, "channel")
    try:
        tune_socket(stream)
    except OSError as exc:  # the peer is already gone
        admission.refuse(None, label, f"socket unusable: {exc.strerror}")
        stream.socket.close()
        return
    if session.channels_accepted >= session.config.channels:
        # Every channel id is taken: nothing more can be accepted.
        admission.refuse(
            None,
            label,
            f"all {session.config.channels} channels are set up (does the sender open more"
            " channels than --channels?)",
        )
        reset_on_close(stream)
        stream.socket.close()
        return
    ticket = admission.enter(label, stream.socket)
    if session.config.tls is not None:
        nursery.start_soon(_run_tls_channel, session, stream, ticket)
    else:
        nursery.start_soon(run_channel, session, stream, ticket)


async def _run_tls_channel(session: Session, stream: trio.SocketStream, ticket: Pending) -> None:
    """A data channel under TLS: nothing reaches the framer before the TLS handshake
    (and, with a CA, the peer's certificate) was accepted within the handshake timeout;
    a failed handshake refuses this channel only. The TLS handshake counts as pending
    (its bytes as the connection's activity), and eviction ends it."""
    assert session.config.tls is not None
    tls = trio.SSLStream(MeteredStream(stream, ticket), session.config.tls, server_side=True)
    timeout = session.config.handshake_timeout
    why = None
    try:
        with ticket.evictable(), trio.fail_after(timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        why = f"no tls handshake within {timeout:g} s"
    except trio.BrokenResourceError as exc:
        why = f"tls handshake failed: {exc.__cause__ or exc}"
    except BaseException:  # the session ended
        session.admission.release(ticket)
        reset_on_close(stream)
        await trio.aclose_forcefully(stream)
        raise
    if why is not None or ticket.evicted:
        if why is not None:
            session.admission.refuse(ticket, ticket.label, why)
        reset_on_close(stream)  # a refusal, not an orderly end
        await trio.aclose_forcefully(stream)
        return
    await run_channel(session, tls, ticket)


async def _watchdog(session: Session) -> None:
    """Fail the session when nothing moved for ``stall_timeout`` seconds, or when no data
    channel came within ``first_channel_timeout``; check for missing packets once every
    channel ended before all of them had come."""
    timeout = session.config.stall_timeout
    tick = min(0.25, timeout / 4)
    last = session.progress
    since = trio.current_time()
    quiet_since: float | None = None
    waiting = _FirstChannelWait(session, since)
    while True:
        await trio.sleep(tick)
        now = trio.current_time()
        if not session.channels_accepted and waiting.check(now):
            return
        if session.progress != last or not session.started or _sink_busy(session):
            last = session.progress
            since = now
        elif now - since >= timeout:
            for device in list(session.devices.values()):
                if device.loaded_at is None and device.error is None:
                    message = (
                        f"{device.name}: no progress for {timeout:g} s: {_stall_reason(device)}"
                    )
                    session.fail(StallError(message, device=device.name), device)
            return
        # Every channel that came has gone, but not all came: wait a grace period.
        if session.channels_accepted and not session.channels_open:
            quiet_since = quiet_since if quiet_since is not None else now
            if now - quiet_since >= min(LATE_CHANNEL_GRACE, timeout):
                check_missing(session, "every channel ended")
        else:
            quiet_since = None


class _FirstChannelWait:
    """The wait for the first data channel: a line at intervals, and the optional bound."""

    def __init__(self, session: Session, start: float) -> None:
        self.session = session
        self.start = start
        self.bound = session.config.first_channel_timeout
        self.every = (
            WAITING_LOG_INTERVAL
            if self.bound is None
            else min(WAITING_LOG_INTERVAL, max(self.bound / 4, 0.25))
        )
        self.next_line = start + self.every

    def check(self, now: float) -> bool:
        """Log when a line is due; True when the session failed for the bound."""
        waited = now - self.start
        where = ", ".join(self.session.bound)
        if self.bound is not None and waited >= self.bound:
            self.session.fail(
                StallError(
                    f"no data channel within {self.bound:g} s (listening on {where}):"
                    " no sender came"
                )
            )
            return True
        if now >= self.next_line:
            self.next_line += self.every
            of = f" of {self.bound:g}" if self.bound is not None else ""
            log.warning(
                "no data channel yet: waited %.0f%s s (listening on %s)",
                waited,
                of,
                where,
                extra=event(
                    "waiting_for_channels",
                    waited=round(waited, 3),
                    timeout=self.bound,
                    listening=list(self.session.bound),
                ),
            )
        return False


def _sink_busy(session: Session) -> bool:
    """True while a loader is inside a sink call (it is parked in its lot otherwise): a
    sink that takes longer than the stall timeout to write one batch is slow, not stuck
    on the peer, and its backpressure is what holds the channels."""
    return any(
        d.loaded_at is None and d.error is None and not len(d.lot) for d in session.devices.values()
    )


def _stall_reason(device: Device) -> str:
    buf = device.buf
    if buf.complete and not buf.gate_open:
        return "every packet received, waiting for its gate (data-complete or switchover-start)"
    first, count, no_config = buf.missing()
    what = f"next idx {buf.next_idx}"
    if first:
        what += f", missing idx {', '.join(map(str, first))}"
        if count > len(first):
            what += f" and {count - len(first)} more"
    if no_config:
        what += ", config packet not received"
    if not buf.gate_open:
        what += ", gate closed"
    return what


__all__ = ["MigrationFailed", "ReceiverConfig", "serve_receiver"]
