"""What the sender is given and what it reports: shared by the sender and its control driver."""

from __future__ import annotations

from dataclasses import dataclass

from vfiomig._core._errors import VfioMigError
from vfiomig.sources import Source


@dataclass(slots=True)
class SendDevice:
    """One device to send: its identity and where its state comes from."""

    idstr: str
    instance: int
    source: Source

    @property
    def name(self) -> str:
        return f"{self.idstr}/{self.instance}"


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


class SendError(VfioMigError):
    """A channel or a source failed while sending; the message names which."""
