"""`VfioUserDevice`: one emulated device, what outlives its client connections.

A device is put together from parts, each optional: a PCI config space (`PciConfig`),
regions (`Region`, by index), interrupt counts (`Irqs`), migration callbacks
(`MigrationCallbacks`) and a reset callback. The DMA regions the client maps live in
`VfioUserDevice.dma`, the interrupt eventfds in `VfioUserDevice.irqs`; the emulator uses
both (`Dma.translate`/`get`/`read`/`write`, `Irqs.trigger`).

A device with a ``quiesce`` callback is asked to be quiet (no DMA, no interrupts)
before the server changes what it depends on: a migration state change, DMA_MAP,
DMA_UNMAP (also when the client goes away) and DEVICE_RESET, like libvfio-user's
``vfu_setup_device_quiesce_cb``. ``quiesce()`` returns True when it is quiet at once,
False when it will say so later with `VfioUserDevice.quiesced`; the server waits for
that, at most ``quiesce_timeout`` seconds (then the request fails with EBUSY). The device
may run again once the operation's own callbacks (``transition``, ``on_map`` /
``on_unmap``, ``reset``) have run.

The older migration-only `Emulator` protocol (regions by position, migration and reset
callbacks in one object) still works: ``VfioUserDevice(emulator)`` adapts it.

The device does not execute requests itself: `_handlers.handle` turns one request to a
device into a `Reply` (sans-IO: `_connection` does the I/O), so the rules depend on the
device and never the other way round.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

import trio

from vfiomig._logs import event
from vfiomig.vfio_user._layouts import MESSAGE_OVERHEAD
from vfiomig.vfio_user._migration_bodies import MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, MigState
from vfiomig.vfio_user._version import DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_PGSIZE
from vfiomig.vfio_user.server._dma import MAX_REGIONS, Dma
from vfiomig.vfio_user.server._irqs import IrqIndex, Irqs, IrqStateCallback, MaskCallback
from vfiomig.vfio_user.server._migration import Migration, MigrationCallbacks, Transition
from vfiomig.vfio_user.server._pci import CONFIG_REGION, NUM_REGIONS, PciConfig
from vfiomig.vfio_user.server._regions import Buffer, IoEventFd, Region
from vfiomig.vfio_user.server._session import DEFAULT_MAX_MSG_FDS, ResetReason, emulator_error

log = logging.getLogger("vfiomig.vfio_user")

#: How long the server waits for a device to say it is quiet (`VfioUserDevice.quiesced`).
QUIESCE_TIMEOUT: Final = 5.0


class Emulator(Protocol):
    """The migration-only emulator interface (kept for `BarDevice` and older code).

    Regions are indexed by position in ``region_sizes``; ``transition`` (either form),
    ``read_data`` and ``write_data`` are `MigrationCallbacks`; fail with ``OSError(errno, text)``.
    """

    @property
    def region_sizes(self) -> Sequence[int]: ...

    @property
    def transition(self) -> Transition: ...

    def read_data(self, size: int) -> Buffer: ...

    def write_data(self, data: memoryview) -> int: ...

    def region_read(self, index: int, offset: int, count: int) -> Buffer: ...

    def region_write(self, index: int, offset: int, data: memoryview) -> int: ...

    def reset(self) -> None: ...


def _legacy_regions(emulator: Emulator) -> dict[int, Region]:
    def region(index: int, size: int) -> Region:
        def read(offset: int, count: int) -> Buffer:
            return emulator.region_read(index, offset, count)

        def write(offset: int, data: memoryview) -> None:
            if emulator.region_write(index, offset, data) != len(data):
                raise OSError(errno.EINVAL, f"region {index} write was partial")

        return Region(size, read=read, write=write)

    return {i: region(i, size) for i, size in enumerate(emulator.region_sizes)}


class VfioUserDevice:
    """One emulated device behind a vfio-user socket.

    Args:
        emulator: an `Emulator` (migration-only devices); or build from the parts below.
        pci: the config space; the device then has PCI's 9 regions (7 is config).
        regions: index -> `Region`.
        irqs: vectors per `IrqIndex`; ``on_irq_mask`` hears MASK / UNMASK of any type,
            ``irq_state`` per type (``vfu_setup_irq_state_callback``).
        migration: the migration callbacks (none: DEVICE_FEATURE answers EINVAL).
        reset: called with a `ResetReason` on DEVICE_RESET and, if
            ``reset_on_disconnect``, when a client goes away (libvfio-user always does
            that; here it is the emulator's choice, off by default so that a migrated
            state survives the loading client).
        max_data_xfer_size: advertised; bounds region access and message sizes.
        max_msg_fds / max_dma_regions: limits advertised / enforced.
        quiesce / quiesce_timeout: see the module docstring.
    """

    def __init__(
        self,
        emulator: Emulator | None = None,
        *,
        pci: PciConfig | None = None,
        regions: Mapping[int, Region] | None = None,
        irqs: Mapping[IrqIndex, int] | None = None,
        on_irq_mask: MaskCallback | None = None,
        irq_state: Mapping[IrqIndex, IrqStateCallback] | None = None,
        migration: MigrationCallbacks | None = None,
        migration_flags: int = MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
        reset: Callable[[ResetReason], None] | None = None,
        reset_on_disconnect: bool = False,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        max_msg_fds: int = DEFAULT_MAX_MSG_FDS,
        max_dma_regions: int = MAX_REGIONS,
        quiesce: Callable[[], bool] | None = None,
        quiesce_timeout: float = QUIESCE_TIMEOUT,
    ) -> None:
        if max_data_xfer_size < 1:
            raise ValueError(f"max_data_xfer_size {max_data_xfer_size} is below 1")
        self.emulator = emulator
        self.regions: dict[int, Region] = dict(regions or {})
        if emulator is not None:
            self.regions = {**_legacy_regions(emulator), **self.regions}
            migration = migration or emulator
            if reset is None:
                reset = lambda _reason: emulator.reset()  # noqa: E731
        self.pci = pci
        self.num_regions = max(self.regions, default=-1) + 1
        if pci is not None:
            if CONFIG_REGION in self.regions:
                raise ValueError(f"region {CONFIG_REGION} is the PCI config space")
            if self.num_regions > NUM_REGIONS:
                raise ValueError(f"a PCI device has {NUM_REGIONS} regions, not {self.num_regions}")
            pci.build(
                {i: r.size for i, r in self.regions.items()},
                intx=bool((irqs or {}).get(IrqIndex.INTX)),
            )
            self.regions[CONFIG_REGION] = Region(pci.size, read=pci.read, write=pci.write)
            self.num_regions = NUM_REGIONS
            if reset is not None:  # not a method of self: no device <-> pci cycle
                pci.on_flr = functools.partial(reset, ResetReason.PCI_FLR)
        self.irqs = Irqs(irqs or {}, on_mask=on_irq_mask, on_state=irq_state)
        self.dma = Dma(max_regions=max_dma_regions)
        self.migration = None if migration is None else Migration(migration, flags=migration_flags)
        self.reset_callback = reset
        self.reset_on_disconnect = reset_on_disconnect
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds
        self.pgsize = DEFAULT_PGSIZE
        #: The largest dirty bitmap in a DMA_UNMAP reply (it must fit one message).
        self.max_bitmap_size = max_data_xfer_size
        self.quiesce_callback = quiesce
        self.quiesce_timeout = quiesce_timeout
        self._quiet: trio.Event | None = None  # set by `quiesced` while the server waits
        self._quiet_errno = 0

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> MigState:
        """The migration state (RUNNING for a device without migration)."""
        return MigState.RUNNING if self.migration is None else self.migration.state

    @property
    def max_msg_size(self) -> int:
        """The largest message accepted: the data limit plus headers (VERSION fits too)."""
        return max(self.max_data_xfer_size, 4096) + MESSAGE_OVERHEAD

    def do_reset(self, reason: ResetReason) -> None:
        """Run the reset callback, then put the migration state back to RUNNING."""
        if self.reset_callback is not None:
            try:
                self.reset_callback(reason)
            except OSError as exc:
                raise emulator_error(exc, f"reset ({reason.value})") from None
        if self.migration is not None:
            self.migration.reset()

    # ------------------------------------------------------------------ ioeventfds

    def create_ioeventfd(
        self, index: int, fd: int, offset: int, size: int, *, datamatch: int | None = None
    ) -> IoEventFd:
        """Offer ``fd`` (an eventfd the emulator owns and reads) for guest writes of
        ``size`` bytes at ``offset`` of region ``index`` (only of ``datamatch``, if
        given): DEVICE_GET_REGION_IO_FDS hands it to the client (``vfu_create_ioeventfd``).
        A client asks once, when it sets the region up: create them before it connects.
        """
        region = self.regions.get(index)
        if region is None or (index == CONFIG_REGION and self.pci is not None):
            raise ValueError(f"ioeventfd in region {index}: no such region")
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > region.size:
            raise ValueError(
                f"ioeventfd at {offset:#x}+{size} of region {index} ({region.size:#x} bytes)"
            )
        if datamatch is not None and not 0 <= datamatch < 1 << (8 * size):
            raise ValueError(f"ioeventfd datamatch {datamatch:#x} for {size} bytes")
        os.fstat(fd)  # EBADF now rather than at the client's request
        sub = IoEventFd(fd, offset, size, datamatch)
        region.ioeventfds.append(sub)
        return sub

    # ------------------------------------------------------------------ quiesce

    async def quiesce(self, what: str) -> None:
        """Have the emulator quiet before ``what`` (a request's name, for the error).

        Raises:
            OSError: EBUSY when it did not say so within ``quiesce_timeout``, or the
                errno it gave `quiesced`.

        Cancellation: the wait ends; the device is no longer waited for.
        """
        if self.quiesce_callback is None:
            return
        self._quiet, self._quiet_errno = trio.Event(), 0
        try:
            try:
                quiet = self.quiesce_callback()
            except OSError as exc:
                raise emulator_error(exc, f"quiesce ({what})") from None
            if not quiet:
                with trio.move_on_after(self.quiesce_timeout):
                    await self._quiet.wait()
                if not self._quiet.is_set():
                    log.warning(
                        "vfio-user: the device did not quiesce for %s within %.1f s",
                        what,
                        self.quiesce_timeout,
                        extra=event("vfio_user_quiesce_timeout", request=what),
                    )
                    raise OSError(
                        errno.EBUSY,
                        f"device did not quiesce for {what} within {self.quiesce_timeout} s",
                    )
        finally:
            self._quiet = None
        if self._quiet_errno:
            raise OSError(self._quiet_errno, f"device failed to quiesce for {what}")

    def quiesced(self, errno_: int = 0) -> None:
        """The emulator is quiet now (``vfu_device_quiesced``): the request waiting for it
        goes ahead, or fails with ``errno_`` if not 0. Call it from the server's trio
        thread (`VfioUserThread.quiesced` from others); a call nobody waits for is ignored.
        """
        if self._quiet is not None and not self._quiet.is_set():
            self._quiet_errno = errno_
            self._quiet.set()

    def disconnected(self) -> list[int]:
        """A client went away: its DMA mappings and eventfds go (returned for closing);
        the device resets if it asked to. Emulator errors propagate."""
        self.dma.messenger = None
        self.dma.unmap_all()
        self.dma.logging_stop()
        fds = self.irqs.reset()
        if self.reset_on_disconnect:
            try:
                self.do_reset(ResetReason.LOST_CONNECTION)
            except OSError:
                pass  # nobody is left to tell
        return fds
