"""The PCI configuration space of an emulated device (region 7), like ``vfu_pci_init``.

`PciConfig` builds a type-0 header (ids, class code, BARs sized after the device's
regions, interrupt pin when INTx exists), chains capabilities from offset 0x40 (PM, MSI,
MSI-X, PCI Express builders below, or the emulator's own `PciCap`), and serves
REGION_READ/WRITE on it. Writes go through a per-byte writable mask, which gives the
PCI rules for free: BAR sizing (write all ones, read back the size mask), the command
register's writable bits, read-only ids and capability headers. After a write the
emulator's ``on_write(offset, data)`` is told (e.g. to notice MSI-X enable).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

#: Region indexes of a PCI device (VFU_PCI_DEV_*_REGION_IDX).
BAR0: Final = 0
ROM_REGION: Final = 6
CONFIG_REGION: Final = 7
VGA_REGION: Final = 8
NUM_REGIONS: Final = 9

CONFIG_SIZE: Final = 256
EXPRESS_CONFIG_SIZE: Final = 4096
CAP_START: Final = 0x40
COMMAND_WRITABLE: Final = 0x0547  # io, memory, bus master, parity, SERR, INTx disable
STATUS_CAP_LIST: Final = 0x10

CAP_ID_PM: Final = 0x01
CAP_ID_MSI: Final = 0x05
CAP_ID_VENDOR: Final = 0x09
CAP_ID_EXP: Final = 0x10
CAP_ID_MSIX: Final = 0x11


@dataclass(frozen=True, slots=True)
class PciCap:
    """One capability: its id and body (the bytes after the id and next-pointer bytes),
    with a writable mask of the same length (all read-only if ``None``)."""

    cap_id: int
    body: bytes
    writable: bytes | None = None

    @property
    def size(self) -> int:
        return 2 + len(self.body)


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


def pcie_cap(*, device_type: int = 0) -> PciCap:
    """PCI Express capability version 2 (60 bytes); device and link control writable."""
    body = bytearray(58)
    struct.pack_into("<H", body, 0, 0x0002 | device_type << 4)
    mask = bytearray(58)
    struct.pack_into("<H", mask, 6, 0x7FFF)  # device control
    struct.pack_into("<H", mask, 14, 0x0FFF)  # link control
    struct.pack_into("<H", mask, 38, 0xFFFF)  # device control 2
    return PciCap(CAP_ID_EXP, bytes(body), bytes(mask))


def vendor_cap(data: bytes, writable: bytes | None = None) -> PciCap:
    """A vendor-specific capability; its first body byte is the length, as PCI wants."""
    body = bytes([2 + 1 + len(data)]) + data
    return PciCap(CAP_ID_VENDOR, body, None if writable is None else b"\0" + writable)


@dataclass(slots=True)
class PciConfig:
    """A type-0 header and capability list; `build` fills `space` for the device."""

    vendor_id: int
    device_id: int
    subsys_vendor_id: int = 0
    subsys_id: int = 0
    class_code: int = 0  # base class << 16 | subclass << 8 | prog-if
    revision: int = 0
    express: bool = False
    caps: Sequence[PciCap] = ()
    io_bars: frozenset[int] = frozenset()
    on_write: Callable[[int, bytes], None] | None = None
    space: bytearray = field(default_factory=bytearray)
    writable: bytearray = field(default_factory=bytearray)
    cap_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return EXPRESS_CONFIG_SIZE if self.express else CONFIG_SIZE

    def build(self, region_sizes: Mapping[int, int], *, intx: bool) -> None:
        """Lay out the header for BARs of ``region_sizes`` (index -> size) and the caps."""
        space = bytearray(self.size)
        mask = bytearray(self.size)
        struct.pack_into("<HHHH", space, 0, self.vendor_id, self.device_id, 0, 0)
        struct.pack_into("<H", mask, 4, COMMAND_WRITABLE)
        space[8] = self.revision & 0xFF
        space[9:12] = (self.class_code & 0xFFFFFF).to_bytes(3, "little")
        mask[0x0C] = mask[0x0D] = 0xFF  # cache line size, latency timer
        for bar in range(6):
            size = region_sizes.get(bar, 0)
            if size:
                io = bar in self.io_bars
                span = max(1 << (size - 1).bit_length(), 4 if io else 16)
                struct.pack_into("<I", space, 0x10 + 4 * bar, 1 if io else 0)
                struct.pack_into("<I", mask, 0x10 + 4 * bar, ~(span - 1) & 0xFFFFFFFF)
        struct.pack_into("<HH", space, 0x2C, self.subsys_vendor_id, self.subsys_id)
        rom = region_sizes.get(ROM_REGION, 0)
        if rom:
            span = max(1 << (rom - 1).bit_length(), 2048)
            struct.pack_into("<I", mask, 0x30, (~(span - 1) & 0xFFFFFFFF) | 1)
        mask[0x3C] = 0xFF  # interrupt line
        space[0x3D] = 1 if intx else 0
        self._chain(space, mask)
        self.space, self.writable = space, mask

    def _chain(self, space: bytearray, mask: bytearray) -> None:
        self.cap_offsets = {}
        pos, prev_next = CAP_START, 0x34
        for cap in self.caps:
            if pos + cap.size > CONFIG_SIZE:
                raise ValueError(
                    f"pci capabilities need {pos + cap.size} bytes (max {CONFIG_SIZE})"
                )
            if cap.writable is not None and len(cap.writable) != len(cap.body):
                raise ValueError(
                    f"pci capability {cap.cap_id:#x} mask is not {len(cap.body)} bytes"
                )
            space[prev_next] = pos
            space[pos] = cap.cap_id
            space[pos + 2 : pos + cap.size] = cap.body
            if cap.writable is not None:
                mask[pos + 2 : pos + cap.size] = cap.writable
            self.cap_offsets.setdefault(cap.cap_id, pos)
            prev_next = pos + 1
            pos = (pos + cap.size + 3) & ~3
        if self.caps:
            struct.pack_into("<H", space, 6, STATUS_CAP_LIST)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.space[offset : offset + count])

    def write(self, offset: int, data: memoryview) -> None:
        """Apply a write through the writable mask, then tell ``on_write``."""
        end = offset + len(data)
        space, mask = self.space, self.writable
        for i, byte in enumerate(data, offset):
            space[i] = (space[i] & ~mask[i] & 0xFF) | (byte & mask[i])
        if self.on_write is not None:
            self.on_write(offset, bytes(space[offset:end]))

    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self.space, 4)[0])

    def bar(self, index: int) -> int:
        """The address the client programmed into BAR ``index`` (type bits cleared)."""
        return int(struct.unpack_from("<I", self.space, 0x10 + 4 * index)[0]) & ~0xF
