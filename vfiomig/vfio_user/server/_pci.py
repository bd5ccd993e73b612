"""The PCI configuration space of an emulated device (region 7), like ``vfu_pci_init``.

`PciConfig` builds a type-0 header (ids, class code, BARs sized after the device's
regions: I/O, 32-bit or 64-bit memory, prefetchable; interrupt pin when INTx exists),
chains capabilities (PM, MSI, MSI-X, PCI Express builders below, or the emulator's own
`PciCap`) from offset 0x40 or at the offsets the emulator chooses, and extended
capabilities (`PciExtCap`) from 0x100 in a PCI Express device's 4 KiB space, and serves
REGION_READ/WRITE on it. Writes go through a per-byte writable mask, which gives the
PCI rules for free: BAR sizing (write all ones, read back the size mask; both dwords of
a 64-bit BAR), the command register's writable bits, read-only ids and capability
headers.

The emulator can intercept (libvfio-user's ``VFU_REGION_FLAG_ALWAYS_CB`` and
``VFU_CAP_FLAG_CALLBACK``): ``on_read(offset, count)`` may answer a read itself,
``before_write(offset, data)`` may veto a write by raising ``OSError`` (nothing changes,
the client gets the errno), a capability's own ``read`` / ``write`` take every access
to its bytes; ``on_write(offset, data)`` is told after a write (e.g. to notice MSI-X
enable). Setting the PCI Express capability's Initiate FLR bit calls ``on_flr`` (the
device resets with `ResetReason.PCI_FLR`); the bit reads back 0.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

Buffer = bytes | bytearray | memoryview

#: Region indexes of a PCI device (VFU_PCI_DEV_*_REGION_IDX).
BAR0: Final = 0
ROM_REGION: Final = 6
CONFIG_REGION: Final = 7
VGA_REGION: Final = 8
NUM_REGIONS: Final = 9

CONFIG_SIZE: Final = 256
EXPRESS_CONFIG_SIZE: Final = 4096
CAP_START: Final = 0x40
EXT_CAP_START: Final = 0x100
BAR_MEM_64: Final = 0x4
BAR_PREFETCH: Final = 0x8
#: Offsets inside the PCI Express capability (from its id byte).
EXP_DEVCAP: Final = 4
EXP_DEVCTL: Final = 8
DEVCAP_FLR: Final = 1 << 28
DEVCTL_BCR_FLR: Final = 1 << 15
COMMAND_WRITABLE: Final = 0x0547  # io, memory, bus master, parity, SERR, INTx disable
STATUS_CAP_LIST: Final = 0x10

CAP_ID_PM: Final = 0x01
CAP_ID_MSI: Final = 0x05
CAP_ID_VENDOR: Final = 0x09
CAP_ID_EXP: Final = 0x10
CAP_ID_MSIX: Final = 0x11


#: ``read(offset, count)`` of a capability's own callback: ``offset`` from its id byte.
CapRead = Callable[[int, int], Buffer]
#: ``write(offset, data)`` of a capability's own callback (raise ``OSError`` to refuse).
CapWrite = Callable[[int, memoryview], None]


@dataclass(frozen=True, slots=True)
class PciCap:
    """One capability: its id and body (the bytes after the id and next-pointer bytes),
    with a writable mask of the same length (all read-only if ``None``).

    ``offset``: where it goes (4-aligned, from 0x40; default: after the previous one).
    ``read`` / ``write``: every access to its bytes goes to these instead of the stored
    content (``VFU_CAP_FLAG_CALLBACK``; a missing ``write`` makes writes EINVAL).
    """

    cap_id: int
    body: bytes
    writable: bytes | None = None
    offset: int | None = None
    read: CapRead | None = None
    write: CapWrite | None = None

    @property
    def size(self) -> int:
        return 2 + len(self.body)


@dataclass(frozen=True, slots=True)
class PciExtCap:
    """One PCI Express extended capability (in a 4 KiB config space, from 0x100): its
    16-bit id, version and body (the bytes after the 4-byte header); the same
    ``writable``, ``offset``, ``read`` and ``write`` as `PciCap`."""

    cap_id: int
    body: bytes
    version: int = 1
    writable: bytes | None = None
    offset: int | None = None
    read: CapRead | None = None
    write: CapWrite | None = None

    @property
    def size(self) -> int:
        return 4 + len(self.body)


def pm_cap() -> PciCap:
    """Power management, version 3; PMCSR's power state and PME enable are writable."""
    return PciCap(
        CAP_ID_PM, struct.pack("<HHBB", 0x0003, 0x0008, 0, 0), struct.pack("<HHBB", 0, 0x0103, 0, 0)
    )


def msi_cap(vectors: int = 1, *, per_vector_mask: bool = False) -> PciCap:
    """MSI with a 64-bit address; ``vectors`` a power of 2 up to 32."""
    if vectors not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"msi vectors {vectors} (a power of 2 up to 32)")
    control = (vectors.bit_length() - 1) << 1 | 1 << 7 | (1 << 8 if per_vector_mask else 0)
    body = struct.pack("<HIIHH", control, 0, 0, 0, 0)
    mask = struct.pack("<HIIHH", 0x0071, 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFF, 0)
    if per_vector_mask:
        body += struct.pack("<II", 0, 0)
        mask += struct.pack("<II", (1 << vectors) - 1 if vectors < 32 else 0xFFFFFFFF, 0)
    return PciCap(CAP_ID_MSI, body, mask)


def msix_cap(
    vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int
) -> PciCap:
    """MSI-X with ``vectors`` entries; the table and PBA live in the device's BARs."""
    if (
        not 1 <= vectors <= 2048
        or (table_offset | pba_offset) & 7
        or not 0 <= table_bar < 6
        or not 0 <= pba_bar < 6
    ):
        raise ValueError(
            f"msi-x vectors {vectors}, table {table_bar}:{table_offset:#x}, pba {pba_bar}:{pba_offset:#x}"
        )
    body = struct.pack("<HII", vectors - 1, table_offset | table_bar, pba_offset | pba_bar)
    return PciCap(CAP_ID_MSIX, body, struct.pack("<HII", 0xC000, 0, 0))


def pcie_cap(*, device_type: int = 0, flr: bool = True) -> PciCap:
    """PCI Express capability version 2 (60 bytes); device and link control writable.
    With ``flr`` the device says it can do a Function Level Reset, and writing Initiate
    FLR resets it (`ResetReason.PCI_FLR`)."""
    body = bytearray(58)
    struct.pack_into("<H", body, 0, 0x0002 | device_type << 4)
    struct.pack_into("<I", body, EXP_DEVCAP - 2, DEVCAP_FLR if flr else 0)
    mask = bytearray(58)
    struct.pack_into("<H", mask, EXP_DEVCTL - 2, 0xFFFF if flr else 0x7FFF)  # device control
    struct.pack_into("<H", mask, 14, 0x0FFF)  # link control
    struct.pack_into("<H", mask, 38, 0xFFFF)  # device control 2
    return PciCap(CAP_ID_EXP, bytes(body), bytes(mask))


def vendor_cap(data: bytes, writable: bytes | None = None) -> PciCap:
    """A vendor-specific capability; its first body byte is the length, as PCI wants."""
    body = bytes([2 + 1 + len(data)]) + data
    return PciCap(CAP_ID_VENDOR, body, None if writable is None else b"\0" + writable)


#: ``on_read(offset, count)``: the bytes to answer with, or None for the stored content.
ConfigRead = Callable[[int, int], Buffer | None]
#: ``before_write(offset, data)``: raise ``OSError`` to refuse the write.
ConfigWrite = Callable[[int, memoryview], None]


@dataclass(slots=True)
class PciConfig:
    """A type-0 header and capability list; `build` fills `space` for the device.

    BARs are sized after the device's regions: ``io_bars`` are I/O space, ``bars64``
    64-bit memory (BAR n and n + 1; n + 1 must have no region), ``prefetchable``
    memory BARs say so. See the module docstring for the callbacks.
    """

    vendor_id: int
    device_id: int
    subsys_vendor_id: int = 0
    subsys_id: int = 0
    class_code: int = 0  # base class << 16 | subclass << 8 | prog-if
    revision: int = 0
    express: bool = False
    caps: Sequence[PciCap] = ()
    ext_caps: Sequence[PciExtCap] = ()
    io_bars: frozenset[int] = frozenset()
    bars64: frozenset[int] = frozenset()
    prefetchable: frozenset[int] = frozenset()
    on_read: ConfigRead | None = None
    before_write: ConfigWrite | None = None
    on_write: Callable[[int, bytes], None] | None = None
    on_flr: Callable[[], None] | None = None
    space: bytearray = field(default_factory=bytearray)
    writable: bytearray = field(default_factory=bytearray)
    cap_offsets: dict[int, int] = field(default_factory=dict)
    ext_cap_offsets: dict[int, int] = field(default_factory=dict)
    _hooked: list[tuple[int, int, PciCap | PciExtCap]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return EXPRESS_CONFIG_SIZE if self.express else CONFIG_SIZE

    def build(self, region_sizes: Mapping[int, int], *, intx: bool) -> None:
        """Lay out the header for BARs of ``region_sizes`` (index -> size) and the caps.

        Raises:
            ValueError: a BAR or capability layout that cannot be (named in the text).
        """
        space = bytearray(self.size)
        mask = bytearray(self.size)
        struct.pack_into("<HHHH", space, 0, self.vendor_id, self.device_id, 0, 0)
        struct.pack_into("<H", mask, 4, COMMAND_WRITABLE)
        space[8] = self.revision & 0xFF
        space[9:12] = (self.class_code & 0xFFFFFF).to_bytes(3, "little")
        mask[0x0C] = mask[0x0D] = 0xFF  # cache line size, latency timer
        self._bars(region_sizes, space, mask)
        struct.pack_into("<HH", space, 0x2C, self.subsys_vendor_id, self.subsys_id)
        rom = region_sizes.get(ROM_REGION, 0)
        if rom:
            span = max(1 << (rom - 1).bit_length(), 2048)
            struct.pack_into("<I", mask, 0x30, (~(span - 1) & 0xFFFFFFFF) | 1)
        mask[0x3C] = 0xFF  # interrupt line
        space[0x3D] = 1 if intx else 0
        self._hooked = []
        self._chain(space, mask)
        self._chain_extended(space, mask)
        self.space, self.writable = space, mask

    def _bars(self, region_sizes: Mapping[int, int], space: bytearray, mask: bytearray) -> None:
        for bar in self.bars64:
            if not 0 <= bar < 5 or region_sizes.get(bar + 1, 0) or bar in self.io_bars:
                raise ValueError(
                    f"pci bar {bar} cannot be 64-bit (bar {bar + 1} is its upper half)"
                )
        for bar in range(6):
            size = region_sizes.get(bar, 0)
            if not size:
                continue
            io = bar in self.io_bars
            span = max(1 << (size - 1).bit_length(), 4 if io else 16)
            if io:
                kind = 1
            else:
                kind = (BAR_MEM_64 if bar in self.bars64 else 0) | (
                    BAR_PREFETCH if bar in self.prefetchable else 0
                )
            if span > 1 << 31 and bar not in self.bars64:
                raise ValueError(f"pci bar {bar} of {size:#x} bytes needs a 64-bit bar")
            size_mask = ~(span - 1) & 0xFFFFFFFFFFFFFFFF
            struct.pack_into("<I", space, 0x10 + 4 * bar, kind)
            struct.pack_into("<I", mask, 0x10 + 4 * bar, size_mask & 0xFFFFFFF0)
            if bar in self.bars64:
                struct.pack_into("<I", mask, 0x14 + 4 * bar, size_mask >> 32)

    def _chain(self, space: bytearray, mask: bytearray) -> None:
        self.cap_offsets = {}
        pos, prev_next = CAP_START, 0x34
        taken: list[tuple[int, int]] = []
        for cap in self.caps:
            if cap.offset is not None:
                pos = cap.offset
            if pos < CAP_START or pos % 4 or pos + cap.size > CONFIG_SIZE:
                raise ValueError(
                    f"pci capability {cap.cap_id:#x} at {pos:#x}+{cap.size} "
                    f"(4-aligned in {CAP_START:#x}..{CONFIG_SIZE:#x})"
                )
            self._place(cap, pos, taken, space, mask)
            space[prev_next] = pos
            space[pos] = cap.cap_id
            self.cap_offsets.setdefault(cap.cap_id, pos)
            prev_next = pos + 1
            pos = (pos + cap.size + 3) & ~3
        if self.caps:
            struct.pack_into("<H", space, 6, STATUS_CAP_LIST)

    def _chain_extended(self, space: bytearray, mask: bytearray) -> None:
        self.ext_cap_offsets = {}
        if self.ext_caps and not self.express:
            raise ValueError("pci extended capabilities need express=True (a 4 KiB space)")
        pos, prev = EXT_CAP_START, -1
        taken: list[tuple[int, int]] = []
        for cap in self.ext_caps:
            if cap.offset is not None:
                pos = cap.offset
            if pos < EXT_CAP_START or pos % 4 or pos + cap.size > EXPRESS_CONFIG_SIZE:
                raise ValueError(
                    f"pci extended capability {cap.cap_id:#x} at {pos:#x}+{cap.size} "
                    f"(4-aligned in {EXT_CAP_START:#x}..{EXPRESS_CONFIG_SIZE:#x})"
                )
            if prev < 0 and pos != EXT_CAP_START:
                raise ValueError(
                    f"pci extended capability {cap.cap_id:#x} at {pos:#x}: the first is at "
                    f"{EXT_CAP_START:#x}"
                )
            self._place(cap, pos, taken, space, mask, head=4)
            struct.pack_into("<I", space, pos, (cap.cap_id & 0xFFFF) | (cap.version & 0xF) << 16)
            if prev >= 0:
                header = struct.unpack_from("<I", space, prev)[0]
                struct.pack_into("<I", space, prev, header | pos << 20)
            self.ext_cap_offsets.setdefault(cap.cap_id, pos)
            prev = pos
            pos = (pos + cap.size + 3) & ~3

    def _place(
        self,
        cap: PciCap | PciExtCap,
        pos: int,
        taken: list[tuple[int, int]],
        space: bytearray,
        mask: bytearray,
        head: int = 2,
    ) -> None:
        for start, end in taken:
            if pos < end and start < pos + cap.size:
                raise ValueError(
                    f"pci capability {cap.cap_id:#x} at {pos:#x}+{cap.size} overlaps "
                    f"{start:#x}+{end - start}"
                )
        if cap.writable is not None and len(cap.writable) != len(cap.body):
            raise ValueError(f"pci capability {cap.cap_id:#x} mask is not {len(cap.body)} bytes")
        taken.append((pos, pos + cap.size))
        space[pos + head : pos + cap.size] = cap.body
        if cap.writable is not None:
            mask[pos + head : pos + cap.size] = cap.writable
        if cap.read is not None or cap.write is not None:
            self._hooked.append((pos, pos + cap.size, cap))

    # ------------------------------------------------------------------ access

    def read(self, offset: int, count: int) -> Buffer:
        """A REGION_READ of the config space (the callbacks first, see the module)."""
        if self.on_read is not None:
            data = self.on_read(offset, count)
            if data is not None:
                return data
        if self._hooked:
            out = bytearray(self.space[offset : offset + count])
            for start, end, cap in self._hooked:
                lo, hi = max(start, offset), min(end, offset + count)
                if lo < hi and cap.read is not None:
                    part = cap.read(lo - start, hi - lo)
                    if len(part) != hi - lo:
                        raise OSError(
                            errno.EINVAL,
                            f"pci capability {cap.cap_id:#x} read returned {len(part)} bytes "
                            f"(expected {hi - lo})",
                        )
                    out[lo - offset : hi - offset] = part
            return out
        return self.space[offset : offset + count]

    def write(self, offset: int, data: memoryview) -> None:
        """Apply a write through the writable mask, then tell ``on_write``.

        Raises:
            OSError: ``before_write`` or a capability's ``write`` refused it.
        """
        if self.before_write is not None:
            self.before_write(offset, data)
        end = offset + len(data)
        space, mask = self.space, self.writable
        delegated: set[int] = set()
        for start, stop, cap in self._hooked:
            lo, hi = max(start, offset), min(stop, end)
            if lo < hi:
                if cap.write is None:
                    raise OSError(
                        errno.EINVAL, f"pci capability {cap.cap_id:#x} at {start:#x} is read-only"
                    )
                cap.write(lo - start, data[lo - offset : hi - offset])
                delegated.update(range(lo, hi))
        for i, byte in enumerate(data, offset):
            if i not in delegated:
                space[i] = (space[i] & ~mask[i] & 0xFF) | (byte & mask[i])
        self._check_flr(offset, end)
        if self.on_write is not None:
            self.on_write(offset, bytes(space[offset:end]))

    def _check_flr(self, offset: int, end: int) -> None:
        exp = self.cap_offsets.get(CAP_ID_EXP)
        if exp is None:
            return
        ctl = exp + EXP_DEVCTL
        if offset <= ctl + 1 < end:
            value = struct.unpack_from("<H", self.space, ctl)[0]
            if value & DEVCTL_BCR_FLR:
                struct.pack_into("<H", self.space, ctl, value & ~DEVCTL_BCR_FLR)
                if self.on_flr is not None:
                    self.on_flr()

    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self.space, 4)[0])

    def bar(self, index: int) -> int:
        """The address the client programmed into BAR ``index`` (type bits cleared; both
        dwords of a 64-bit BAR)."""
        low = int(struct.unpack_from("<I", self.space, 0x10 + 4 * index)[0])
        if index in self.bars64:
            high = int(struct.unpack_from("<I", self.space, 0x14 + 4 * index)[0])
            return (high << 32 | low) & ~0xF
        return low & ~(0x3 if index in self.io_bars else 0xF)
