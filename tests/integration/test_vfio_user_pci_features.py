"""PCI config-space features of the server library over real UNIX sockets, through the
library's VMM-side client (the ``vfio_user`` fixture): 64-bit and prefetchable BARs,
config-space callbacks with veto, capabilities at chosen offsets and extended
capabilities, FLR through the PCI Express capability. Config space is region 7."""

from __future__ import annotations

import errno
import struct

import pytest

from vfiomig.testing.vfio_user import VfioUserHarness
from vfiomig.vfio_user import (
    PciCap,
    PciConfig,
    PciExtCap,
    Region,
    ResetReason,
    VfioUserClient,
    VfioUserCommandError,
    VfioUserDevice,
    pcie_cap,
    vendor_cap,
)

PAGE = 4096
CONFIG = 7  # the config space region


async def read(client: VfioUserClient, offset: int, count: int) -> bytes:
    return await client.region_read(CONFIG, offset, count)


async def write(client: VfioUserClient, offset: int, data: bytes) -> int | None:
    """0, or the errno the server refused the write with."""
    try:
        await client.region_write(CONFIG, offset, data)
    except VfioUserCommandError as exc:
        return exc.errno
    return 0


def u32(data: bytes) -> int:
    return int.from_bytes(data, "little")


def bar_region(size: int) -> Region:
    return Region(size, read=lambda o, c: bytes(c), write=lambda o, d: None)


# --------------------------------------------------------------------------- BARs


async def test_64bit_prefetchable_bars_size_and_decode(vfio_user: VfioUserHarness) -> None:
    pci = PciConfig(0x1234, 1, bars64=frozenset({0}), prefetchable=frozenset({0, 3}))
    device = VfioUserDevice(
        pci=pci, regions={0: bar_region(8 << 30), 2: bar_region(0x100), 3: bar_region(0x1000)}
    )
    client = await vfio_user.attach(device)
    assert (await client.region(0)).size == 8 << 30
    assert u32(await read(client, 0x10, 4)) == 0xC  # 64-bit, prefetchable
    assert u32(await read(client, 0x18, 4)) == 0x0  # BAR2: 32-bit
    assert u32(await read(client, 0x1C, 4)) == 0x8  # BAR3: prefetchable
    for offset in (0x10, 0x14, 0x18, 0x1C):  # sizing: all ones, read the mask back
        assert await write(client, offset, b"\xff" * 4) == 0
    assert u32(await read(client, 0x10, 4)) == 0x0000000C
    assert u32(await read(client, 0x14, 4)) == 0xFFFFFFFE  # 8 GiB: bit 33 up
    assert u32(await read(client, 0x18, 4)) == 0xFFFFFF00
    assert u32(await read(client, 0x1C, 4)) == 0xFFFFF008
    assert await write(client, 0x10, struct.pack("<II", 0, 0x4)) == 0
    assert pci.bar(0) == 0x4_0000_0000


def test_bar_layouts_that_cannot_be_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a 64-bit bar"):
        VfioUserDevice(pci=PciConfig(1, 1), regions={0: bar_region(4 << 30)})
    with pytest.raises(ValueError, match="bar 0 cannot be 64-bit"):
        VfioUserDevice(
            pci=PciConfig(1, 1, bars64=frozenset({0})),
            regions={0: bar_region(PAGE), 1: bar_region(PAGE)},
        )


# --------------------------------------------------------------------------- config callbacks


async def test_config_read_and_write_callbacks_answer_and_veto(vfio_user: VfioUserHarness) -> None:
    seen: list[tuple[int, bytes]] = []
    cap_writes: list[tuple[int, bytes]] = []

    def on_read(offset: int, count: int) -> bytes | None:
        return b"\xab\xcd"[:count] if offset == 0x2C and count <= 2 else None

    def before_write(offset: int, data: memoryview) -> None:
        if offset == 0x04 and data[0] & 0x4:
            raise OSError(errno.EPERM, "no bus mastering here")

    def cap_read(offset: int, count: int) -> bytes:
        return bytes(range(offset, offset + count))

    def cap_write(offset: int, data: memoryview) -> None:
        cap_writes.append((offset, bytes(data)))

    hooked = PciCap(0x09, bytes(14), read=cap_read, write=cap_write)
    pci = PciConfig(
        0x1234,
        1,
        caps=[hooked],
        on_read=on_read,
        before_write=before_write,
        on_write=lambda offset, data: seen.append((offset, data)),
    )
    device = VfioUserDevice(pci=pci, regions={0: bar_region(PAGE)})
    client = await vfio_user.attach(device)
    assert await read(client, 0x2C, 2) == b"\xab\xcd"  # answered by on_read
    assert await read(client, 0x00, 2) == b"\x34\x12"  # stored content
    assert await write(client, 0x04, b"\x04\x00") == errno.EPERM  # vetoed
    assert pci.command == 0 and seen == []
    assert await write(client, 0x04, b"\x02\x00") == 0
    assert pci.command == 2 and seen == [(0x04, b"\x02\x00")]
    assert await read(client, 0x40, 4) == bytes(range(4))  # the cap's own read
    assert await write(client, 0x44, b"\x99") == 0
    assert cap_writes == [(4, b"\x99")]


# --------------------------------------------------------------------------- capabilities


async def test_capabilities_at_chosen_offsets_and_extended_capabilities(
    vfio_user: VfioUserHarness,
) -> None:
    pci = PciConfig(
        0x1234,
        1,
        express=True,
        caps=[pcie_cap(), vendor_cap(b"late"), PciCap(0x05, bytes(12), offset=0xC0)],
        ext_caps=[
            PciExtCap(0x0001, bytes(44), version=2),
            PciExtCap(0x000B, b"vfio", offset=0x200),
        ],
    )
    device = VfioUserDevice(pci=pci, regions={0: bar_region(PAGE)})
    client = await vfio_user.attach(device)
    assert (await client.region(7)).size == 4096
    chain, pos = [], (await read(client, 0x34, 1))[0]
    while pos:
        cap_id, pos_next = await read(client, pos, 2)
        chain.append((pos, cap_id))
        pos = pos_next
    assert chain == [(0x40, 0x10), (0x7C, 0x09), (0xC0, 0x05)]
    ext, pos = [], 0x100
    while pos:
        header = u32(await read(client, pos, 4))
        ext.append((pos, header & 0xFFFF, header >> 16 & 0xF))
        pos = header >> 20
    assert ext == [(0x100, 0x0001, 2), (0x200, 0x000B, 1)]
    assert await read(client, 0x204, 4) == b"vfio"


def test_capability_layouts_that_cannot_be_are_refused() -> None:
    def build(**kwargs: object) -> None:
        VfioUserDevice(pci=PciConfig(1, 1, **kwargs), regions={})  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="overlaps"):
        build(caps=[PciCap(0x05, bytes(12), offset=0x60), PciCap(0x09, bytes(4), offset=0x68)])
    with pytest.raises(ValueError, match="4-aligned"):
        build(caps=[PciCap(0x05, bytes(4), offset=0x62)])
    with pytest.raises(ValueError, match="need express=True"):
        build(ext_caps=[PciExtCap(1, bytes(4))])
    with pytest.raises(ValueError, match="the first is at 0x100"):
        build(express=True, ext_caps=[PciExtCap(1, bytes(4), offset=0x180)])


# --------------------------------------------------------------------------- FLR


async def test_initiate_flr_resets_the_device(vfio_user: VfioUserHarness) -> None:
    reasons: list[ResetReason] = []
    pci = PciConfig(0x1234, 1, express=True, caps=[pcie_cap()])
    device = VfioUserDevice(pci=pci, regions={0: bar_region(PAGE)}, reset=reasons.append)
    exp = pci.cap_offsets[0x10]
    client = await vfio_user.attach(device)
    assert u32(await read(client, exp + 4, 4)) & 1 << 28  # FLR capable
    assert await write(client, exp + 8, struct.pack("<H", 0x0010)) == 0
    assert reasons == []
    assert await write(client, exp + 8, struct.pack("<H", 0x8010)) == 0
    assert reasons == [ResetReason.PCI_FLR]
    assert u32(await read(client, exp + 8, 2)) == 0x0010  # the bit reads back 0
