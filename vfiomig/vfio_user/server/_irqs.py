"""Interrupts: DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS and the emulator's `Irqs.trigger`.

The client wires each vector to an eventfd (SET_IRQS, DATA_EVENTFD, fds over SCM_RIGHTS);
the emulator raises a vector with `Irqs.trigger`, which writes 1 to that eventfd. MASK and
UNMASK follow VFIO: a masked vector that fires is remembered and delivered on UNMASK.
Validation is libvfio-user's ``device_set_irqs_validate``: index, start and count within
the table, one action and one data type, ERR/REQ take TRIGGER only with count <= 1,
count 0 only as "disable all" (TRIGGER | DATA_NONE), fds only with DATA_EVENTFD and as
many as ``count``; and every fd must be an eventfd (a pipe or a socket could take the
server's writes away or stall them).

Signalling never blocks the server: `signal_eventfd` (module ``_eventfds``) writes a
non-blocking eventfd directly and hands a blocking one (libvfio-user's samples make them)
to a small, capped pool of threads, so a client that never reads its eventfd stalls none.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from vfiomig.vfio_user._layouts import (
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    IrqSet,
)
from vfiomig.vfio_user.server._eventfds import EVENTFD_KIND, fd_kind, signal_eventfd


class IrqIndex(enum.IntEnum):
    """The PCI interrupt indexes (VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


#: Called with ``(index, start, count, masked)`` on MASK / UNMASK.
MaskCallback = Callable[[IrqIndex, int, int, bool], None]
#: One interrupt type's ``(start, count, masked)`` (``vfu_setup_irq_state_callback``).
IrqStateCallback = Callable[[int, int, bool], None]
#: The types `Irqs.trigger_enabled` tries, in order (the guest enables one at a time).
_ENABLED_ORDER: Final = (IrqIndex.MSIX, IrqIndex.MSI, IrqIndex.INTX)


def _einval(text: str) -> OSError:
    return OSError(errno.EINVAL, text)


class Irqs:
    """The device's interrupt vectors and the eventfds the client gave for them.

    Args:
        counts: vectors per index (absent: 0). ERR and REQ have at most 1.
        on_mask: told about MASK / UNMASK requests (optional).
        on_state: per type, told about that type's MASK / UNMASK (after ``on_mask``).
    """

    def __init__(
        self,
        counts: Mapping[IrqIndex, int],
        on_mask: MaskCallback | None = None,
        on_state: Mapping[IrqIndex, IrqStateCallback] | None = None,
    ) -> None:
        self.counts = {index: int(counts.get(index, 0)) for index in IrqIndex}
        for index, count in self.counts.items():
            limit = (
                1
                if index in (IrqIndex.ERR, IrqIndex.REQ)
                else (1 if index == IrqIndex.INTX else 2048)
            )
            if not 0 <= count <= limit:
                raise ValueError(f"irq index {index.name} count {count} (max {limit})")
        self.on_mask = on_mask
        self.on_state = dict(on_state or {})
        self._fds: dict[IrqIndex, list[int | None]] = {
            i: [None] * c for i, c in self.counts.items()
        }
        self._masked: dict[IrqIndex, list[bool]] = {i: [False] * c for i, c in self.counts.items()}
        self._pending: dict[IrqIndex, list[bool]] = {i: [False] * c for i, c in self.counts.items()}

    def info(self, index: int) -> tuple[int, int]:
        """``(flags, count)`` for GET_IRQ_INFO; EINVAL for an unknown index."""
        if index not in IrqIndex._value2member_map_:
            raise _einval(f"irq info index {index} (max {max(IrqIndex)})")
        flags = IRQ_INFO_EVENTFD
        if index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX):
            flags |= IRQ_INFO_MASKABLE
        return flags, self.counts[IrqIndex(index)]

    def eventfd(self, index: IrqIndex, vector: int) -> int | None:
        """The eventfd wired to a vector, if any (for tests and tools)."""
        return self._fds[index][vector]

    # ------------------------------------------------------------------ SET_IRQS

    def set_irqs(self, req: IrqSet, fds: Sequence[int]) -> list[int]:
        """Apply one SET_IRQS; returns the fds it did not keep (the caller closes them).

        Raises:
            OSError: EINVAL for anything libvfio-user refuses (nothing changed then).
        """
        self._validate(req, fds)
        index = IrqIndex(req.index)
        vectors = range(req.start, req.start + req.count)
        if req.action in (IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK):
            masked = req.action == IRQ_SET_ACTION_MASK
            chosen = self._chosen(req, vectors)
            for v in chosen:
                self._masked[index][v] = masked
                if not masked and self._pending[index][v]:
                    self._pending[index][v] = False
                    self._signal(index, v)
            if self.on_mask is not None:
                self.on_mask(index, req.start, req.count, masked)
            state = self.on_state.get(index)
            if state is not None:
                state(req.start, req.count, masked)
            return list(fds)
        # TRIGGER
        if req.data_type == IRQ_SET_DATA_NONE and req.count == 0:
            return self.disable(index)
        if req.data_type == IRQ_SET_DATA_EVENTFD:
            closed: list[int] = []
            given: Sequence[int | None] = fds if fds else [None] * req.count
            for v, fd in zip(vectors, given, strict=True):
                old = self._fds[index][v]
                if old is not None:
                    closed.append(old)
                self._fds[index][v] = fd
            return closed
        for v in self._chosen(req, vectors):
            self.trigger(index, v, strict=False)
        return []

    @staticmethod
    def _chosen(req: IrqSet, vectors: range) -> list[int]:
        if req.data_type == IRQ_SET_DATA_BOOL:
            return [v for v, flag in zip(vectors, req.data, strict=False) if flag]
        return list(vectors)

    def _validate(self, req: IrqSet, fds: Sequence[int]) -> None:
        what = (
            f"set irqs index {req.index} start {req.start} count {req.count} flags {req.flags:#x}"
        )
        if req.argsz < 20:
            raise _einval(f"{what}: argsz {req.argsz} (min 20)")
        if req.index not in IrqIndex._value2member_map_:
            raise _einval(f"{what}: no such index")
        if req.action not in (IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK, IRQ_SET_ACTION_TRIGGER):
            raise _einval(f"{what}: not exactly one action")
        if req.data_type not in (IRQ_SET_DATA_NONE, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD):
            raise _einval(f"{what}: not exactly one data type")
        if req.flags & ~0x3F:
            raise _einval(f"{what}: unknown flags")
        if req.data_type == IRQ_SET_DATA_BOOL and len(req.data) != req.count:
            raise _einval(f"{what}: {len(req.data)} bools")
        count = self.counts[IrqIndex(req.index)]
        if req.start >= count or req.start + req.count > count:
            raise _einval(f"{what}: past the {count} vectors")
        if req.index in (IrqIndex.ERR, IrqIndex.REQ) and req.action != IRQ_SET_ACTION_TRIGGER:
            raise _einval(f"{what}: ERR and REQ take TRIGGER only")
        if req.count == 0 and (
            req.start or req.action != IRQ_SET_ACTION_TRIGGER or req.data_type != IRQ_SET_DATA_NONE
        ):
            raise _einval(f"{what}: count 0 is only TRIGGER | DATA_NONE")
        if fds and (req.data_type != IRQ_SET_DATA_EVENTFD or len(fds) != req.count):
            raise _einval(f"{what}: {len(fds)} fds")
        for i, fd in enumerate(fds):
            kind = fd_kind(fd)
            if kind != EVENTFD_KIND:
                raise _einval(f"{what}: fd {i} is {kind}, not an eventfd")

    # ------------------------------------------------------------------ emulator side

    def trigger(self, index: IrqIndex, vector: int = 0, *, strict: bool = True) -> bool:
        """Raise a vector: True if delivered (or held while masked), False if not: no
        eventfd (``strict=False``), or its eventfd full or refused (`signal_eventfd`).

        Raises:
            IndexError: no such vector.
            OSError: ENOENT if ``strict`` and the client wired no eventfd to it.
        """
        if not 0 <= vector < self.counts[index]:
            raise IndexError(f"irq {index.name} vector {vector} (count {self.counts[index]})")
        if self._masked[index][vector]:
            self._pending[index][vector] = True
            return True
        if self._fds[index][vector] is None:
            if strict:
                raise OSError(errno.ENOENT, f"irq {index.name} vector {vector} has no eventfd")
            return False
        return self._signal(index, vector)

    def trigger_enabled(self, vector: int = 0) -> IrqIndex | None:
        """Raise ``vector`` of the interrupt type the guest enabled (``vfu_irq_trigger``):
        MSI-X, else MSI, else INTx, whichever has eventfds wired; returns that type, or
        None when the client wired none of them (nothing is raised then).

        Raises:
            IndexError: the enabled type has no such vector.
        """
        for index in _ENABLED_ORDER:
            if any(fd is not None for fd in self._fds[index]):
                self.trigger(index, vector, strict=False)
                return index
        return None

    def _signal(self, index: IrqIndex, vector: int) -> bool:
        fd = self._fds[index][vector]
        return fd is not None and signal_eventfd(fd)

    def disable(self, index: IrqIndex) -> list[int]:
        """Forget every eventfd of ``index``; returns them for closing."""
        fds = [fd for fd in self._fds[index] if fd is not None]
        self._fds[index] = [None] * self.counts[index]
        self._masked[index] = [False] * self.counts[index]
        self._pending[index] = [False] * self.counts[index]
        return fds

    def reset(self) -> list[int]:
        """Disable every index (client gone); returns the fds to close."""
        return [fd for index in IrqIndex for fd in self.disable(index)]
