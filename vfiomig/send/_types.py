"""What the sender is given and what it reports: shared by the sender and its control driver."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from vfiomig._core._errors import VfioMigError, os_error_text
from vfiomig._core._wire import device_name
from vfiomig._logs import event
from vfiomig.sources import Source


@dataclass(slots=True)
class SendDevice:
    """One device to send: its identity and where its state comes from."""

    idstr: str
    instance: int
    source: Source

    @property
    def name(self) -> str:
        return device_name(self.idstr, self.instance)

    async def queued(self, counts: dict[str, tuple[int, int]], nbytes: int, packets: int) -> None:
        """Every packet of this device is queued (by either sender): the source finishes,
        ``counts`` gets its bytes and packets, and a line says so."""
        await self.source.finish()
        counts[self.name] = (nbytes, packets)
        logging.getLogger("vfiomig").info(
            "%s: queued %d bytes in %d packets",
            self.name,
            nbytes,
            packets,
            extra=event("send_device_queued", self.name, bytes=nbytes, packets=packets),
        )

    def source_failed(self, cause: str, exc: BaseException) -> SourceFailed:
        """Its source failed (either sender): one line naming the device, the source and
        ``cause``."""
        failure = SourceFailed(
            f"{self.name}: reading source {self.source.description} failed: {cause}"
        )
        failure.__cause__ = exc
        return failure

    def read_failed(self, exc: BaseException) -> SourceFailed:
        """`source_failed` for what reading the source raised (either sender): a
        vfiomig error's own text, an ``OSError``'s strerror and errno."""
        cause = str(exc) if isinstance(exc, VfioMigError) else os_error_text(exc)
        return self.source_failed(cause, exc)


@dataclass(frozen=True, slots=True)
class PrecopyOptions:
    """How the precopy phase iterates (``vfiomig send --precopy-threshold/--precopy-rounds``).

    A device's precopy ends when it reports at most ``threshold`` bytes pending (the rest
    goes in STOP_COPY), after ``rounds`` rounds, or when a round left more pending than
    the one before (not converging). ``rounds=0``: no precopy phase at all.
    ``chunk``: data bytes per ``precopy`` message. ``window``: precopy bytes a device may
    have sent but the receiver not yet written; ``stall``: how long the receiver may
    write none of them (see `vfiomig.send._precopy`).
    """

    threshold: int = 1 << 20
    rounds: int = 8
    chunk: int = 512 * 1024
    window: int = 64 << 20
    stall: float = 30.0


@dataclass(frozen=True, slots=True)
class PrecopyReport:
    """One device's precopy phase: rounds read, bytes sent, the pending bytes the device
    reported at the start of each round and at the end, and why it stopped
    (``converged``, ``round limit``, ``not converging``)."""

    rounds: int
    bytes: int
    pending: tuple[int, ...]
    stopped: str


@dataclass(frozen=True, slots=True)
class SendReport:
    """What was handed to the channels."""

    bytes: int
    packets: int
    seconds: float
    per_device: dict[str, tuple[int, int]]  # name -> (data bytes, packets incl. config)
    channel_bytes: tuple[int, ...] = ()  # wire bytes sent on each channel after its handshake
    #: With ``control``: the receiver's ``loaded``, ``error`` and ``done`` events.
    control_events: tuple[dict[str, object], ...] = ()
    #: With ``control``: each precopy device's phase, by device name.
    precopy: dict[str, PrecopyReport] = field(default_factory=dict)
    #: CPU seconds of this process (every thread) during the send (`time.process_time`).
    cpu_seconds: float = 0.0


@dataclass(slots=True)
class SendStatus:
    """What a running `send_migration` has done so far, updated in place (a progress line
    reads it): the phase (``connecting``, ``precopy``, ``stop-copy``, ``waiting for the
    receiver``, ``done``), precopy bytes sent on the control channel, multifd bytes on the
    wire (headers included), data channels open; ``done`` is set when the call returns."""

    phase: str = "connecting"
    precopy_bytes: int = 0
    sent_bytes: int = 0
    channels: int = 0
    done: trio.Event = field(default_factory=trio.Event)


class SendError(VfioMigError):
    """A channel or a source failed while sending; the message names which."""


class SourceFailed(SendError):
    """A device's source failed (the sending side is at fault, not the receiver)."""
