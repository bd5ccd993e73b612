"""`VfioUserDevice`: one emulated device, what outlives its client connections.

A device is put together from parts, each optional: a PCI config space (`PciConfig`),
regions (`Region`, by index), interrupt counts (`Irqs`), migration callbacks
(`MigrationCallbacks`) and a reset callback. The DMA regions the client maps live in
`VfioUserDevice.dma`, the interrupt eventfds in `VfioUserDevice.irqs`; the emulator uses
both (`Dma.translate`/`get`/`read`/`write`, `Irqs.trigger`).

The older migration-only `Emulator` protocol (regions by position, migration and reset
callbacks in one object) still works: ``VfioUserDevice(emulator)`` adapts it.

The device does not execute requests itself: `_handlers.handle` turns one request to a
device into a `Reply` (sans-IO: `_connection` does the I/O), so the rules depend on the
device and never the other way round.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from vfiomig.vfio_user._layouts import MESSAGE_OVERHEAD
from vfiomig.vfio_user._migration_bodies import MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, MigState
from vfiomig.vfio_user._version import DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_PGSIZE
from vfiomig.vfio_user.server._dma import MAX_REGIONS, Dma
from vfiomig.vfio_user.server._irqs import IrqIndex, Irqs, MaskCallback
from vfiomig.vfio_user.server._migration import Migration, MigrationCallbacks, Transition
from vfiomig.vfio_user.server._pci import CONFIG_REGION, NUM_REGIONS, PciConfig
from vfiomig.vfio_user.server._regions import Buffer, Region
from vfiomig.vfio_user.server._session import DEFAULT_MAX_MSG_FDS, ResetReason, emulator_error


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
        irqs: vectors per `IrqIndex`; ``on_irq_mask`` hears MASK / UNMASK.
        migration: the migration callbacks (none: DEVICE_FEATURE answers EINVAL).
        reset: called with a `ResetReason` on DEVICE_RESET and, if
            ``reset_on_disconnect``, when a client goes away (libvfio-user always does
            that; here it is the emulator's choice, off by default so that a migrated
            state survives the loading client).
        max_data_xfer_size: advertised; bounds region access and message sizes.
        max_msg_fds / max_dma_regions: limits advertised / enforced.
    """

    def __init__(
        self,
        emulator: Emulator | None = None,
        *,
        pci: PciConfig | None = None,
        regions: Mapping[int, Region] | None = None,
        irqs: Mapping[IrqIndex, int] | None = None,
        on_irq_mask: MaskCallback | None = None,
        migration: MigrationCallbacks | None = None,
        migration_flags: int = MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
        reset: Callable[[ResetReason], None] | None = None,
        reset_on_disconnect: bool = False,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        max_msg_fds: int = DEFAULT_MAX_MSG_FDS,
        max_dma_regions: int = MAX_REGIONS,
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
        self.irqs = Irqs(irqs or {}, on_mask=on_irq_mask)
        self.dma = Dma(max_regions=max_dma_regions)
        self.migration = None if migration is None else Migration(migration, flags=migration_flags)
        self.reset_callback = reset
        self.reset_on_disconnect = reset_on_disconnect
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds
        self.pgsize = DEFAULT_PGSIZE
        #: The largest dirty bitmap in a DMA_UNMAP reply (it must fit one message).
        self.max_bitmap_size = max_data_xfer_size

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
