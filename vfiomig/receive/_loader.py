"""One loader task per device: writes its stream in order, then the finish step.

The loader owns its device's sink: it alone starts, finishes, aborts and closes it, and
it writes the batches its device's reorder buffer makes ready. The one other writer is a
channel task, for a sink that `writes_nowait`: while the loader is parked with nothing to
write, the task that made batches ready writes them synchronously (`wake_loader`). Both
go through the same batch steps (`_take_batch`, `_batch_written`, the starved clock in
`_starved_from` / `_starved_until_now`), with no await between taking a batch and writing
it, so the sink sees one sequence in idx order and never two calls at once.

The loader promises, when it returns or is cancelled, that the sink was finished (device
loaded) or aborted, and closed.
"""

from __future__ import annotations

import logging
import math

import trio

from vfiomig._core import Ready, SinkError, VfioMigError
from vfiomig._core._errors import os_error_text
from vfiomig._logs import event
from vfiomig.receive._session import Device, Session, SessionEvent
from vfiomig.sinks import ConfigTarget

log = logging.getLogger("vfiomig")

#: How long an abort or close of a sink may take once the session failed.
CLEANUP_TIMEOUT = 10.0

#: While a device's sink is writing, its channels read ahead only until the device holds
#: this many bytes (`ReorderBuffer.backlog_cap`); the whole `--max-queued` budget is theirs
#: again once the loader waits for data. A sink slower than the channels would otherwise
#: fill the budget, and every page of it is faulted in once (256 MiB: ~0.12 s of CPU here).
#: Two of the loader's batches (16 MiB each at most), so that the sink never waits.
SINK_BACKLOG = 32 << 20


def _sink_error(device: Device, what: str, exc: BaseException) -> SinkError:
    if isinstance(exc, SinkError):
        errno = exc.errno
        cause = exc.message
    else:
        errno = getattr(exc, "errno", None)
        cause = os_error_text(exc)
    return SinkError(f"{device.name}: {what}: {cause}", device=device.name, errno=errno)


def _trace_write(device: Device, ready: Ready, when: str) -> None:
    """QEMU's per-buffer trace points around a sink write (``-vv``)."""
    what = "precopy data" if ready.precopy else f"idx {ready.first_idx}..{ready.end_idx - 1}"
    log.debug(
        "%s: %s %s (%d bytes)",
        device.name,
        when.replace("_", " "),
        what,
        ready.nbytes,
        extra=event(
            f"vfio_load_state_device_buffer_{when}",
            device.name,
            idx=ready.first_idx,
            end_idx=ready.end_idx,
            bytes=ready.nbytes,
            precopy=ready.precopy,
        ),
    )


async def run_loader(session: Session, device: Device, config: ConfigTarget) -> None:
    """Write ``device``'s stream to its sink in idx order, then replay the config.

    Cancellation: on cancel (session failed) the sink is aborted and closed under a
    shield bounded by `CLEANUP_TIMEOUT`.
    """
    sink = device.setup.sink
    buf = device.buf
    timeout = session.config.sink_timeout  # bounds every write and the finish
    loaded = False
    try:
        try:
            await sink.start()
        except (OSError, SinkError) as exc:
            raise _sink_error(device, f"starting sink {sink.description} failed", exc) from exc
        log.info(
            "%s: load start (sink %s)",
            device.name,
            sink.description,
            extra=event("vfio_load_state_device_buffer_start", device.name, sink=sink.description),
        )
        await _load_stream(session, device)
        # The finish step: config first, then the sink leaves its loading state.
        assert buf.config is not None
        log.info(
            "%s: config load start (%d bytes, to %s)",
            device.name,
            len(buf.config),
            config.description,
            extra=event(
                "vfio_load_device_config_state_start",
                device.name,
                idx=buf.config_idx,
                bytes=len(buf.config),
                target=config.description,
            ),
        )
        try:
            await config.load_config(buf.config)
        except (OSError, SinkError) as exc:
            err = _sink_error(device, f"loading config to {config.description} failed", exc)
            err.idx = buf.config_idx
            raise err from exc
        # What the device itself takes (a vfio-user device's PCI config space); the log
        # says whether anything reached the device, not only the config target.
        try:
            with trio.fail_after(timeout):
                replayed = await sink.load_config(bytes(buf.config))
        except trio.TooSlowError as exc:
            raise SinkError(
                f"{device.name}: replaying config into {sink.description} took more than {timeout:g} s",
                device=device.name,
                idx=buf.config_idx,
            ) from exc
        except (OSError, SinkError) as exc:
            err = _sink_error(device, f"replaying config into {sink.description} failed", exc)
            err.idx = buf.config_idx
            raise err from exc
        into = f"{replayed} into {sink.description}" if replayed else "nothing into the device"
        log.info(
            "%s: config load end (blob to %s, %s)",
            device.name,
            config.description,
            into,
            extra=event(
                "vfio_load_device_config_state_end",
                device.name,
                target=config.description,
                device_config=replayed,
            ),
        )
        try:
            with trio.fail_after(timeout):
                await sink.finish()
        except trio.TooSlowError as exc:
            raise SinkError(
                f"{device.name}: finishing sink {sink.description} took more than {timeout:g} s",
                device=device.name,
            ) from exc
        except (OSError, SinkError) as exc:
            err = _sink_error(device, f"finishing sink {sink.description} failed", exc)
            err.idx = exc.idx if isinstance(exc, SinkError) else None
            raise err from exc
        buf.mark_loaded()
        loaded = True
        session.device_loaded(device)
        st = buf.statistics()
        log.info(
            "%s: load end: loaded %d bytes in %d packets",
            device.name,
            st.written_bytes,
            st.written_packets,
            extra=event(
                "vfio_load_state_device_buffer_end",
                device.name,
                bytes=st.written_bytes,
                packets=st.written_packets,
                starved_seconds=st.starved_seconds,
            ),
        )
        session.emit(SessionEvent("loaded", device))
    except VfioMigError as exc:
        session.fail(exc, device)
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
            if not loaded:
                await sink.abort()
            await sink.aclose()


async def _load_stream(session: Session, device: Device) -> None:
    """Write ``device``'s batches to its sink in idx order until it can finish.

    One cancel scope bounds every write: its deadline is set for a write and lifted after
    it (a ``trio.fail_after`` per batch cost about as much Python as the rest of a batch).
    While it is parked, channel tasks may write batches in its place (`wake_loader`); a
    batch one of them could not finish without blocking comes back as ``device.handoff``.

    Cancellation: propagates; a write cut short leaves the device failed.
    """
    sink = device.setup.sink
    buf = device.buf
    timeout = session.config.sink_timeout
    trace = log.isEnabledFor(logging.DEBUG)  # once: the loop below is the hot path
    device.nowait = sink.writes_nowait and not trace  # trace points come from here only
    writing: Ready | None = None
    with trio.CancelScope() as guard:
        while True:
            ready = _take_batch(device, trace)
            if ready is not None:
                if ready.chunks:
                    writing = ready
                    guard.deadline = trio.current_time() + timeout
                    buf.backlog_cap = SINK_BACKLOG
                    try:
                        await sink.write(ready.chunks)
                    except (OSError, SinkError) as exc:
                        raise _write_error(device, ready, exc) from exc
                    guard.deadline = math.inf
                    writing = None
                _batch_written(session, device, ready, trace)
                continue
            if buf.finishable:
                return
            if device.input_ended is not None:  # everything before the gap is written
                raise buf.incomplete_error(device.input_ended)
            buf.backlog_cap = 0  # waiting for data: the channels may use the whole budget
            _starved_from(device)  # channel tasks that write close the wait
            await device.lot.park()
            _starved_until_now(device, trace)
    # Only the guard's deadline ends the loop this way: a write took too long.
    assert writing is not None
    raise SinkError(
        f"{device.name}: sink {sink.description} did not finish writing"
        f" idx {writing.first_idx}..{writing.end_idx - 1} within {timeout:g} s",
        device=device.name,
        idx=writing.first_idx,
    )


def wake_loader(session: Session, device: Device) -> None:
    """``device`` may have batches ready: if its loader is parked, write them from the
    calling task when the sink `writes_nowait`, else wake the loader.

    A loader that is not parked looks for batches itself before it parks again. A batch
    the sink cannot take without blocking goes to the loader as ``device.handoff`` (its
    note already given), and the loader writes the rest of it before anything else.
    """
    if not device.lot or not device.buf.has_ready():
        return
    if not device.nowait or session.failed:
        device.lot.unpark_all()
        return
    buf = device.buf
    sink = device.setup.sink
    _starved_until_now(device, False)  # device.nowait: no trace points
    while (ready := _take_batch(device, False)) is not None:
        if ready.chunks:
            try:
                done = sink.write_nowait(ready.chunks)
            except (OSError, SinkError) as exc:
                ready.release()
                session.fail(_write_error(device, ready, exc), device)
                return
            if not done:  # the loader writes the rest, waiting for room
                device.handoff = ready
                device.lot.unpark_all()
                return
        _batch_written(session, device, ready, False)
    if buf.finishable or device.input_ended is not None:
        device.lot.unpark_all()
    else:
        _starved_from(device)


def _take_batch(device: Device, trace: bool) -> Ready | None:
    """The next batch to write: one a channel task handed back, else the buffer's next
    ready run; the sink is told its idx range (`Sink.note_batch`) once per batch."""
    ready = device.handoff
    if ready is not None:  # noted before it was handed back
        device.handoff = None
        return ready
    ready = device.buf.take_ready()
    if ready is not None and ready.chunks:
        device.setup.sink.note_batch(ready.first_idx, ready.end_idx)
        if trace:
            _trace_write(device, ready, "load_start")
    return ready


def _batch_written(session: Session, device: Device, ready: Ready, trace: bool) -> None:
    """After every byte of ``ready`` reached the sink: its bytes leave the budget, its
    receive blocks go back to the channels, and channels waiting for room wake."""
    device.buf.written(ready.nbytes)
    if trace and ready.chunks:
        _trace_write(device, ready, "load_end")
    ready.release()  # the receive blocks it pinned go back to the channels
    session.progress += 1
    if session.room:
        session.room.unpark_all()


def _starved_from(device: Device) -> None:
    """Nothing left to write: with the gate open the stream waits for its next idx from
    now, until a writer (the loader or a channel task) closes the wait."""
    if device.buf.gate_open:
        device.starved_since = trio.current_time()


def _starved_until_now(device: Device, trace: bool) -> None:
    """Close the starved wait, if one is open: add it to the device's starved time."""
    since, device.starved_since = device.starved_since, None
    if since is None:
        return
    waited = trio.current_time() - since
    device.buf.starved_seconds += waited
    if trace:
        log.debug(
            "%s: starved %.6f s at idx %d",
            device.name,
            waited,
            device.buf.next_idx,
            extra=event(
                "vfio_load_state_device_buffer_starved",
                device.name,
                idx=device.buf.next_idx,
                seconds=waited,
            ),
        )


def _write_error(device: Device, ready: Ready, exc: OSError | SinkError) -> SinkError:
    """The loader's error for a failed write of ``ready``."""
    sink = device.setup.sink
    if isinstance(exc, SinkError) and exc.idx is not None:
        # A write confirmed late: the sink names the idx it carried.
        err = _sink_error(device, f"sink {sink.description} failed", exc)
        err.idx = exc.idx
        return err
    what = (
        "writing precopy data"
        if ready.precopy
        else f"writing idx {ready.first_idx}..{ready.end_idx - 1}"
    )
    err = _sink_error(device, f"sink {sink.description} failed {what}", exc)
    err.idx = ready.first_idx
    return err
