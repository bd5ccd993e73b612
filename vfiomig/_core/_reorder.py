"""The per-device reorder buffer: every reassembly rule of SPEC.md §2, without I/O.

One `ReorderBuffer` per device. Channel readers offer each packet's header
(`ReorderBuffer.offer`, the only ingress and the only place peer errors are raised),
read its data only when the offer is accepted, and hand the data over with
`ReorderBuffer.deliver`. The device's loader takes in-order runs with
`ReorderBuffer.take_ready`, writes them, and reports the bytes with
`ReorderBuffer.written`. When `ReorderBuffer.finishable` is true the config blob is
replayed and the device is marked loaded.

Memory: every accepted packet's data counts as queued in a `Budget` shared by the devices
of a session from `offer` until `written`. An offer is accepted when the budget has room,
when it is a config packet, or when it is its device's next idx to write and nothing of
that device is taken but not yet written; otherwise the reader waits (backpressure) and
offers again after the next `written`. The next-idx exemption keeps a device whose next
packet does not fit from waiting forever; requiring the loader to be idle keeps it to one
packet: while the loader writes an over-budget packet, the one after it waits. So queued
bytes stay within the budget plus one data packet and the config packet per device, and
the readers never read more than one packet ahead each.

After an error the buffer is poisoned: every later call raises the same error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vfiomig._core._errors import (
    ConfigStateError,
    PacketError,
    StreamIncompleteError,
    VfioMigError,
)
from vfiomig._core._wire import (
    VFIO_FLAG_CONFIG_STATE,
    VFIO_IDX_INVALID,
    VFIO_PACKET_VERSION,
    check_config_blob,
)

Buffer = bytes | bytearray | memoryview

#: take_ready() never returns more than this many chunks or bytes at once, so that budget
#: is released while a long in-order run is written.
MAX_BATCH_CHUNKS = 1024
MAX_BATCH_BYTES = 16 * 1024 * 1024


class Budget:
    """Queued-bytes accounting shared by the devices of one session.

    ``queued`` counts the payload bytes of the packets accepted and not yet written;
    ``slack`` the rest of the memory they pin: the C core keeps a packet received with
    others in its channel's receive block until it is written, and a block the channel
    moved on from stays whole while any of its packets is held, so the budget counts its
    free part too. An offer fits while ``queued + slack + size <= limit``. ``peak`` is of
    ``queued`` (SPEC §2's rule, the report's peak), ``peak_pinned`` of ``queued + slack``.
    This core copies every packet into a buffer of its own, so its slack is always 0.
    """

    __slots__ = ("limit", "peak", "peak_pinned", "queued", "slack")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued = 0
        self.slack = 0
        self.peak = 0
        self.peak_pinned = 0

    def add(self, n: int) -> None:
        self.queued += n
        if self.queued > self.peak:
            self.peak = self.peak_pinned = self.queued

    def release(self, n: int) -> None:
        self.queued -= n
        assert self.queued >= 0, "budget released more than it held"


@dataclass(frozen=True, slots=True)
class DeviceStatistics:
    """A snapshot of one device's reassembly state."""

    name: str
    next_idx: int
    config_idx: int | None
    queued_bytes: int
    queued_packets: int
    peak_queued_bytes: int
    received_packets: int
    written_bytes: int
    written_packets: int
    precopy_bytes: int
    starved_seconds: float
    gate_open: bool
    loaded: bool


@dataclass(slots=True)
class Ready:
    """A batch for the loader: precopy chunks, or data of idx ``first_idx .. end_idx-1``."""

    #: A list here; the C core's `vfiomig._native.Run`: the packets pinned in place, the
    #: chunks built when asked for, written by the fd sinks from C.
    chunks: Sequence[Buffer] = field(default_factory=list)
    nbytes: int = 0
    first_idx: int = 0
    end_idx: int = 0
    precopy: bool = False

    def release(self) -> None:
        """Let go of the chunks' memory once they are written: a `Run` returns its pins
        (its receive blocks can be reused), a list is left to the collector."""
        release = getattr(self.chunks, "release", None)
        if release is not None:
            release()


class ReorderBuffer:
    """Reassembles one device's packets into its in-order stream.

    Args:
        name: the device's display name, prefixed to every message.
        budget: the session's shared queued-bytes budget.
    """

    def __init__(self, name: str, budget: Budget) -> None:
        self.name = name
        self.budget = budget
        self.next_idx = 0  # next data idx to hand to the loader
        self.config_idx: int | None = None
        self.config: bytes | None = None
        self.gate_open = False
        self.loaded = False
        self.starved_seconds = 0.0
        #: When above 0, `offer` also refuses a packet (under the same exceptions as the
        #: budget) that would take this device's queued bytes past it: the receiver sets
        #: it while the device's sink is busy, so that a slow sink does not fill the budget.
        self.backlog_cap = 0
        self._slots: dict[int, Buffer | None] = {}  # idx -> data; None while in flight
        self._sizes: dict[int, int] = {}  # idx -> reserved size, for in-flight packets
        self._max_data_idx = -1
        self._precopy: list[Buffer] = []
        self._multifd_taken = False
        self._queued_packets = 0
        self._queued_bytes = 0
        self._peak_queued = 0
        self._received = 0
        self._written_bytes = 0
        self._written_packets = 0
        self._precopy_bytes = 0
        self._unwritten = 0  # bytes taken by the loader, not yet reported written
        self._error: VfioMigError | None = None

    # -- ingress -------------------------------------------------------------------

    def offer(self, version: int, idx: int, flags: int, size: int) -> bool:
        """Check a packet's header; reserve budget and return True if its data may be read.

        On False nothing changed: wait for `written` (or the gate) and offer again. The
        next idx to write is accepted over budget (and `backlog_cap`) only while the loader
        has nothing of this device taken but unwritten.

        Raises:
            PacketError: unknown version, invalid idx, duplicate, second config packet,
                data above the config idx.
        """
        if self._error is not None:
            raise self._error
        try:
            self._check(version, idx, flags)
        except VfioMigError as exc:
            self._error = exc
            raise
        if not (flags & VFIO_FLAG_CONFIG_STATE or (idx == self.next_idx and self._unwritten == 0)):
            budget = self.budget
            if budget.queued + budget.slack + size > budget.limit:
                return False
            if 0 < self.backlog_cap < self._queued_bytes + size:
                return False
        self._slots[idx] = None
        self._sizes[idx] = size
        self._queue(size, +1)
        if flags & VFIO_FLAG_CONFIG_STATE:
            self.config_idx = idx
        elif idx > self._max_data_idx:
            self._max_data_idx = idx
        return True

    def _check(self, version: int, idx: int, flags: int) -> None:
        name = self.name
        if version != VFIO_PACKET_VERSION:
            raise PacketError(
                f"{name}: packet idx {idx} has unknown version {version}"
                f" (expected {VFIO_PACKET_VERSION})",
                device=name,
                idx=idx,
            )
        if idx == VFIO_IDX_INVALID:
            raise PacketError(f"{name}: packet index is invalid ({idx:#x})", device=name, idx=idx)
        if idx < self.next_idx:
            raise PacketError(f"{name}: packet idx {idx} already written", device=name, idx=idx)
        if idx in self._slots or idx == self.config_idx:
            raise PacketError(f"{name}: packet idx {idx} already received", device=name, idx=idx)
        if flags & VFIO_FLAG_CONFIG_STATE:
            if self.config_idx is not None:
                raise ConfigStateError(
                    f"{name}: second config packet idx {idx} (first was idx {self.config_idx})",
                    device=name,
                    idx=idx,
                )
            if idx < self._max_data_idx:
                raise PacketError(
                    f"{name}: config packet idx {idx} is below data idx {self._max_data_idx}",
                    device=name,
                    idx=idx,
                )
        elif self.config_idx is not None and idx > self.config_idx:
            raise PacketError(
                f"{name}: data packet idx {idx} is above the config idx {self.config_idx}",
                device=name,
                idx=idx,
            )

    def deliver(self, idx: int, data: Buffer) -> None:
        """Hand over the data of an accepted packet (exactly the offered size).

        Raises:
            ConfigStateError: the config blob's markers are wrong.
        """
        if self._error is not None:
            raise self._error
        assert self._slots.get(idx, 0) is None, "deliver() without an accepted offer"
        assert len(data) == self._sizes[idx], "delivered size differs from the offer"
        del self._sizes[idx]
        self._received += 1
        if idx == self.config_idx:
            try:
                check_config_blob(self.name, idx, data)
            except VfioMigError as exc:
                self._error = exc
                raise
            del self._slots[idx]
            self.config = bytes(data)
            return
        self._slots[idx] = data

    def add_precopy(self, data: bytes) -> None:
        """Queue main-channel (precopy) state; it is written before any multifd data.

        Raises:
            PacketError: multifd data was already written.
        """
        if self._error is not None:
            raise self._error
        if self._multifd_taken:
            self._error = PacketError(
                f"{self.name}: precopy data after multifd data idx {self.next_idx - 1} was written",
                device=self.name,
                idx=self.next_idx - 1,
            )
            raise self._error
        if data:
            self._precopy.append(data)
            self._queue(len(data), +1)

    def open_gate(self) -> None:
        """Allow multifd data to be written (data-complete, switchover-start, --gate open)."""
        self.gate_open = True

    def fail(self, error: VfioMigError) -> None:
        """Poison the buffer with an error found outside it (sink failure, abort)."""
        if self._error is None:
            self._error = error

    @property
    def error(self) -> VfioMigError | None:
        return self._error

    # -- egress --------------------------------------------------------------------

    def has_ready(self) -> bool:
        """True when `take_ready` would return something or the device can finish."""
        if self._precopy:
            return True
        if not self.gate_open:
            return False
        return self._slots.get(self.next_idx) is not None or self.finishable

    def take_ready(self) -> Ready | None:
        """Take the next batch to write: pending precopy, else (gate open) the in-order run
        of received data from `next_idx`. Zero-length packets are skipped, never written."""
        if self._error is not None:
            raise self._error
        if self._precopy:
            pre, self._precopy = self._precopy, []
            ready = Ready(pre, precopy=True, first_idx=self.next_idx, end_idx=self.next_idx)
            ready.nbytes = sum(len(c) for c in pre)
            self._precopy_bytes += ready.nbytes
            self._unwritten += ready.nbytes
            self._queued_packets -= len(ready.chunks)
            return ready
        if not self.gate_open:
            return None
        slots = self._slots
        idx = self.next_idx
        chunks: list[Buffer] = []
        ready = Ready(chunks, first_idx=idx)
        nbytes = 0
        npackets = 0
        while len(chunks) < MAX_BATCH_CHUNKS and nbytes < MAX_BATCH_BYTES:
            data = slots.get(idx)
            if data is None:
                break
            del slots[idx]
            n = len(data)
            if n:
                chunks.append(data)
                nbytes += n
            npackets += 1
            idx += 1
        if not npackets:
            return None
        self._multifd_taken = True
        self.next_idx = idx
        ready.end_idx = idx
        ready.nbytes = nbytes
        self._queued_packets -= npackets
        self._written_packets += npackets
        self._unwritten += nbytes
        return ready

    def written(self, nbytes: int) -> None:
        """The loader wrote ``nbytes`` taken with `take_ready`; release their budget."""
        assert 0 <= nbytes <= self._unwritten, "written more than was taken"
        self._unwritten -= nbytes
        self._written_bytes += nbytes
        self._queued_bytes -= nbytes
        self.budget.release(nbytes)

    @property
    def finishable(self) -> bool:
        """Gate open, config received, every data idx below it written: run the finish step."""
        return (
            self.gate_open
            and self.config is not None
            and self.next_idx == self.config_idx
            and not self._precopy
            and self._unwritten == 0
            and self._error is None
            and not self.loaded
        )

    def mark_loaded(self) -> None:
        """The finish step is done: release the config blob's budget.

        Raises:
            the error that poisoned the buffer while the finish step ran (e.g. a second
            config packet): the device is then not loaded.
        """
        if self._error is not None:
            raise self._error
        assert self.finishable, "mark_loaded() before the device could finish"
        assert self.config is not None
        self._queue(-len(self.config), -1)
        self.loaded = True

    def _queue(self, nbytes: int, npackets: int) -> None:
        self._queued_bytes += nbytes
        self._queued_packets += npackets
        if nbytes >= 0:
            self.budget.add(nbytes)
            if self._queued_bytes > self._peak_queued:
                self._peak_queued = self._queued_bytes
        else:
            self.budget.release(-nbytes)

    # -- diagnosis -----------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every packet (data and config) was received."""
        if self.config is None or self.config_idx is None:
            return False
        slots = self._slots
        return all(slots.get(i) is not None for i in range(self.next_idx, self.config_idx))

    def missing(self, limit: int = 8) -> tuple[list[int], int, bool]:
        """Return (the first ``limit`` missing idx, how many are missing, config missing).

        Without a config packet the end of the stream is unknown: then only the gaps below
        the highest data idx received count, and the third value is True.
        """
        end = self.config_idx if self.config_idx is not None else self._max_data_idx + 1
        have = self._slots
        first: list[int] = []
        count = 0
        for i in range(self.next_idx, end):
            if have.get(i) is None:
                count += 1
                if len(first) < limit:
                    first.append(i)
        return first, count, self.config is None

    def incomplete_error(self, why: str) -> StreamIncompleteError:
        """Build the 'stream ended with packets missing' error for this device."""
        first, count, no_config = self.missing()
        parts = []
        if count:
            listed = ", ".join(str(i) for i in first)
            more = f" and {count - len(first)} more" if count > len(first) else ""
            parts.append(f"missing idx {listed}{more} ({count} packets)")
        if no_config:
            parts.append("config packet not received")
        what = "; ".join(parts) or "nothing missing"
        return StreamIncompleteError(
            f"{self.name}: {why}: {what}", device=self.name, idx=first[0] if first else None
        )

    def statistics(self) -> DeviceStatistics:
        return DeviceStatistics(
            name=self.name,
            next_idx=self.next_idx,
            config_idx=self.config_idx,
            queued_bytes=self._queued_bytes,
            queued_packets=self._queued_packets,
            peak_queued_bytes=self._peak_queued,
            received_packets=self._received,
            written_bytes=self._written_bytes,
            written_packets=self._written_packets,
            precopy_bytes=self._precopy_bytes,
            starved_seconds=self.starved_seconds,
            gate_open=self.gate_open,
            loaded=self.loaded,
        )
