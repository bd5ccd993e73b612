"""The state one receive session shares between its tasks, and its final report.

Everything here runs in one trio thread, so tasks share it without locks. Ownership:
channel tasks call the `ReorderBuffer` ingress (``offer``/``deliver``); the device's
loader task alone takes data out and writes it; the control channel opens gates and adds
precopy data. Wakeups go through two parking lots: ``Device.lot`` wakes that device's
loader, ``Session.room`` wakes channel readers parked on the memory budget.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from vfiomig._core import Budget, Ready, ReorderBuffer
from vfiomig._core._errors import AbortedError, PacketError, UsageError, VfioMigError
from vfiomig._core._wire import DEFAULT_PACKET_CAP, Endian, device_name
from vfiomig._logs import event
from vfiomig.sinks import ConfigTarget, Sink
from vfiomig.transport import Admission, default_max_pending

log = logging.getLogger("vfiomig")


@dataclass(slots=True)
class DeviceSetup:
    """One device of a receive session: where its stream and its config go."""

    idstr: str
    instance: int
    sink: Sink
    config: ConfigTarget | None = None

    @property
    def name(self) -> str:
        return device_name(self.idstr, self.instance)


@dataclass(slots=True)
class ReceiverConfig:
    """Everything a receive session needs (the command line's options, as values).

    ``max_queued`` is the budget for queued payload bytes shared by all devices.
    ``stall_timeout`` bounds the time without progress once the first packet came.
    ``sink_timeout`` bounds one sink write (a batch of at most 16 MiB) and the sink's finish.
    ``config_target`` is used for devices whose `DeviceSetup.config` is None.
    ``tls``: a server context; every data channel must then complete a TLS handshake
    (within ``handshake_timeout``) before its first byte is read.
    ``max_pending``: data connections accepted whose handshake (TLS included) has not
    finished, at most; at the limit the one silent the longest is evicted (None:
    `default_max_pending`, 4 x channels + 16).
    ``first_channel_timeout``: fail the session when no data channel was accepted this
    long after the listeners opened (None: wait for ever, as QEMU's ``-incoming`` does).
    """

    uuid: bytes
    channels: int
    devices: list[DeviceSetup]
    listen: list[str] = field(default_factory=lambda: ["tcp:127.0.0.1:0"])
    gate: str = "open"  # "open" or "control"
    max_queued: int = 256 * 1024 * 1024
    packet_cap: int = DEFAULT_PACKET_CAP
    stall_timeout: float = 30.0
    sink_timeout: float = 60.0
    handshake_timeout: float = 10.0
    endian: Endian = "be"
    ram_page_count: int | None = None
    config_target: Callable[[DeviceSetup], ConfigTarget] | None = None
    tls: ssl.SSLContext | None = None
    max_pending: int | None = None
    first_channel_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """How one device's load ended."""

    name: str
    idstr: str
    instance: int
    loaded: bool
    bytes: int
    packets: int
    precopy_bytes: int
    seconds: float
    peak_queued_bytes: int
    starved_seconds: float
    error: str | None


@dataclass(frozen=True, slots=True)
class SessionReport:
    """How a receive session ended; ``ok`` only when every device was loaded.

    Connections: ``channels_refused`` data connections were refused (bad or late
    handshake, every channel set up), ``channels_evicted`` evicted before their handshake
    ended (see `vfiomig.transport.Admission`); ``control_refused`` and
    ``control_evicted`` are the same for the control channel.
    """

    ok: bool
    devices: tuple[DeviceReport, ...]
    errors: tuple[str, ...]
    seconds: float
    peak_queued_bytes: int
    channels_accepted: int
    channels_refused: int
    channels_evicted: int = 0
    control_refused: int = 0
    control_evicted: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 6),
            "peak_queued_bytes": self.peak_queued_bytes,
            "channels_accepted": self.channels_accepted,
            "channels_refused": self.channels_refused,
            "channels_evicted": self.channels_evicted,
            "control_refused": self.control_refused,
            "control_evicted": self.control_evicted,
            "errors": list(self.errors),
            "devices": [
                {
                    "device": d.idstr,
                    "instance": d.instance,
                    "loaded": d.loaded,
                    "bytes": d.bytes,
                    "packets": d.packets,
                    "precopy_bytes": d.precopy_bytes,
                    "seconds": round(d.seconds, 6),
                    "peak_queued_bytes": d.peak_queued_bytes,
                    "starved_seconds": round(d.starved_seconds, 6),
                    "error": d.error,
                }
                for d in self.devices
            ],
        }


class MigrationFailed(VfioMigError):
    """A receive session failed; ``report`` says which devices and why."""

    def __init__(self, report: SessionReport) -> None:
        lines = [d.error for d in report.devices if d.error] + list(report.errors)
        super().__init__("; ".join(lines) or "migration failed")
        self.report = report


class Device:
    """A device's live state in a session."""

    def __init__(self, setup: DeviceSetup, budget: Budget) -> None:
        self.setup = setup
        self.idstr = setup.idstr
        self.instance = setup.instance
        self.name = setup.name
        self.buf = ReorderBuffer(self.name, budget)
        self.lot = trio.lowlevel.ParkingLot()  # the loader parks here
        self.first_packet: float | None = None
        self.loaded_at: float | None = None
        self.error: VfioMigError | None = None
        #: Why no more packets can come while some are missing (every channel ended); the
        #: loader fails the device with it once it has written what is ready.
        self.input_ended: str | None = None
        #: Set by the loader when its sink `writes_nowait` (and no -vv trace is on): while
        #: the loader is parked with nothing to write, the channel tasks write ready
        #: batches themselves (`vfiomig.receive._loader.wake_loader`).
        self.nowait = False
        #: A batch a channel task could not finish without blocking; the loader writes
        #: the rest of it before anything else.
        self.handoff: Ready | None = None
        #: Since when the stream has waited for its next idx with the gate open: set by
        #: the loader when it parks and by a channel task after the batches it wrote;
        #: whoever writes or wakes next adds the wait to the starved time.
        self.starved_since: float | None = None


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """Something the control channel or a progress display may want to show."""

    kind: str  # "loaded", "error", "done", "config"
    device: Device | None = None
    message: str = ""
    data: bytes = b""


class Session:
    """Shared state of one receive session."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self.budget = Budget(config.max_queued)
        self.devices: dict[tuple[str, int], Device] = {}
        for setup in config.devices:
            key = (setup.idstr, setup.instance)
            if key in self.devices:
                raise UsageError(f"device {setup.name} is given twice")
            self.devices[key] = Device(setup, self.budget)
        self.room = trio.lowlevel.ParkingLot()  # channel readers waiting for budget
        self.progress = 0  # bumped on every packet, write or precopy: the stall watchdog's pulse
        self.started = False  # a packet or precopy arrived: the stall clock runs
        self.started_at: float | None = None
        self.channel_ids: set[int] = set()
        self.channels_open = 0
        self.channels_accepted = 0
        #: Pending data connections (all data listeners share the cap).
        self.admission = Admission(
            config.max_pending
            if config.max_pending is not None
            else default_max_pending(config.channels),
            floor=config.channels + 4,  # out of fds: room for every channel still
        )
        #: Counts an extra task adds to the report and the progress events (the control
        #: channel's refused and evicted connections): called at report time.
        self.counters: list[Callable[[], dict[str, int]]] = []
        self.errors: list[VfioMigError] = []  # failures not tied to a device
        self.failed = False
        self.done = trio.Event()
        self.listeners: list[Callable[[SessionEvent], None]] = []
        self.bound: list[str] = []  # data listeners' real addresses
        self.cancel_scope = trio.CancelScope()

    @property
    def channels_refused(self) -> int:
        return self.admission.statistics().refused

    def connection_counts(self) -> dict[str, int]:
        """Refused and evicted connections so far: the data channels' and whatever the
        extra tasks count (`counters`; the control channel's), as report fields."""
        data = self.admission.statistics()
        counts = {"channels_refused": data.refused, "channels_evicted": data.evicted}
        for counter in self.counters:
            counts.update(counter())
        return counts

    # -- routing and wakeups ---------------------------------------------------------

    def route(self, idstr: str, instance: int, idx: int | None = None) -> Device:
        try:
            return self.devices[idstr, instance]
        except KeyError:
            at = f" (packet idx {idx})" if idx is not None else ""
            raise PacketError(
                f"unknown device {idstr!r} instance {instance}{at}", idx=idx
            ) from None

    def mark_started(self) -> None:
        if not self.started:
            self.started = True
            self.started_at = trio.current_time()

    def open_gate(self, device: Device) -> None:
        device.buf.open_gate()
        log.info("%s: gate open", device.name, extra=event("gate_open", device.name))
        device.lot.unpark_all()

    def open_all_gates(self) -> None:
        for device in self.devices.values():
            self.open_gate(device)

    def add_precopy(self, device: Device, data: bytes) -> None:
        """Queue precopy (main-channel) data; it is written before any multifd data."""
        try:
            device.buf.add_precopy(data)
        except VfioMigError as exc:
            self.fail(exc, device)
            return
        self.mark_started()
        self.progress += 1
        device.lot.unpark_all()

    # -- outcome -------------------------------------------------------------------

    def emit(self, event: SessionEvent) -> None:
        for listener in self.listeners:
            listener(event)

    def fail(self, error: VfioMigError, device: Device | None = None) -> None:
        """Record a failure and cancel the session. Later failures are recorded too, but
        only the first one per device is kept."""
        if device is None:
            # Errors name their device as the message's prefix (the C core's too).
            device = next(
                (d for d in self.devices.values() if str(error).startswith(d.name + ": ")), None
            )
        if device is not None:
            if device.error is None and not (device.loaded_at is not None):
                device.error = error
                device.buf.fail(error)
                log.info("failed: %s", error, extra=event("device_failed", device.name))
                self.emit(SessionEvent("error", device, str(error)))
        else:
            self.errors.append(error)
            log.info("failed: %s", error, extra=event("session_failed"))
            self.emit(SessionEvent("error", None, str(error)))
        self.failed = True
        self.cancel_scope.cancel()
        self.done.set()

    def abort(self, reason: str) -> None:
        """Fail every device not yet loaded (the control channel's ``abort``)."""
        for device in self.devices.values():
            if device.loaded_at is None:
                self.fail(
                    AbortedError(f"{device.name}: migration aborted: {reason}", device=device.name),
                    device,
                )

    def device_loaded(self, device: Device) -> None:
        device.loaded_at = trio.current_time()
        if all(d.loaded_at is not None for d in self.devices.values()):
            self.done.set()

    def report(self) -> SessionReport:
        now = trio.current_time()
        first_error = str(self.errors[0]) if self.errors else None
        if first_error is None:
            first_error = next((str(d.error) for d in self.devices.values() if d.error), None)
        devices = []
        for d in self.devices.values():
            st = d.buf.statistics()
            loaded = d.loaded_at is not None
            error = None
            if d.error is not None:
                error = str(d.error)
            elif not loaded:
                error = f"{d.name}: not loaded: {first_error or 'session cancelled'}"
            start = d.first_packet if d.first_packet is not None else now
            devices.append(
                DeviceReport(
                    name=d.name,
                    idstr=d.idstr,
                    instance=d.instance,
                    loaded=loaded,
                    bytes=st.written_bytes,
                    packets=st.written_packets,
                    precopy_bytes=st.precopy_bytes,
                    seconds=(d.loaded_at if d.loaded_at is not None else now) - start,
                    peak_queued_bytes=st.peak_queued_bytes,
                    starved_seconds=st.starved_seconds,
                    error=error,
                )
            )
        ok = not self.failed and all(d.loaded for d in devices)
        start = self.started_at if self.started_at is not None else now
        return SessionReport(
            ok=ok,
            devices=tuple(devices),
            errors=tuple(str(e) for e in self.errors),
            seconds=now - start,
            peak_queued_bytes=self.budget.peak,
            channels_accepted=self.channels_accepted,
            **self.connection_counts(),
        )
