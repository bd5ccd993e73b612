"""PCI config space carried by a standalone migration (no VMM attached).

A vfio-user server serves one client at a time, so a device migrated by ``vfiomig send``
/ ``receive`` with ``vfio-user:`` on both ends has no VMM to restore its config space:
the source reads it (region 7) and puts it in the config blob, the sink writes its
writable state back into the destination in the finish step. With a VMM attached the
VMM owns config space (QEMU saves it in its own config blob, which the sink leaves
alone and the config target receives).

Body between the QEMU markers (SPEC §2), host byte order like vfio-user itself::

    u32 magic 0x55504656 ("VFPU"), u16 version 1, u16 reserved 0, u32 size,
    then size bytes: the config space as the source's REGION_READ returned it

Replay order (what a VMM does on resume): the header's programmable registers (BARs,
expansion ROM, cache line size, latency timer, interrupt line), then every capability's
registers except its enable bits (MSI address, data and mask; PCI Express device and
link control; vendor data), then the enable bits (MSI and MSI-X message control, power
management control/status), and the command register last, so that decoding and bus
mastering start with every address in place.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Final

from vfiomig._core._errors import ConfigStateError
from vfiomig._logs import event
from vfiomig.vfio_user._layouts import DEVICE_FLAGS_PCI
from vfiomig.vfio_user.client._client import VfioUserClient
from vfiomig.vfio_user.client._pipeline import VfioUserCommandError

log = logging.getLogger("vfiomig.vfio_user")

MAGIC: Final = 0x55504656
VERSION: Final = 1
_HEAD: Final = struct.Struct("=IHHI")
CONFIG_REGION: Final = 7
#: The largest config space carried (PCI Express: 4 KiB).
MAX_SIZE: Final = 4096

_CAP_PM: Final = 0x01
_CAP_MSI: Final = 0x05
_CAP_VENDOR: Final = 0x09
_CAP_EXP: Final = 0x10
_CAP_MSIX: Final = 0x11


def encode(space: bytes) -> bytes:
    """The config body for ``space`` (without the QEMU markers)."""
    return _HEAD.pack(MAGIC, VERSION, 0, len(space)) + space


def decode(name: str, body: bytes) -> bytes | None:
    """The config space in ``body`` (between the markers); None when the body is not ours
    (empty, or a VMM's own config state).

    Raises:
        ConfigStateError: our magic with a wrong version or size.
    """
    if len(body) < _HEAD.size or _HEAD.unpack_from(body)[0] != MAGIC:
        return None
    _, version, _, size = _HEAD.unpack_from(body)
    if version != VERSION:
        raise ConfigStateError(f"{name}: pci config space version {version} (expected {VERSION})")
    if size not in (256, MAX_SIZE) or len(body) != _HEAD.size + size:
        raise ConfigStateError(
            f"{name}: pci config space of {size} bytes in a body of {len(body)} "
            f"(256 or {MAX_SIZE}, plus {_HEAD.size})"
        )
    return body[_HEAD.size :]


@dataclass(frozen=True, slots=True)
class Write:
    """One register write of the replay: ``size`` bytes at ``offset``."""

    offset: int
    size: int
    what: str


def replay_plan(space: bytes) -> list[Write]:
    """The writes that restore ``space``'s writable state, in the safe order."""
    header = [Write(0x10 + 4 * bar, 4, f"bar{bar}") for bar in range(6)]
    header += [
        Write(0x30, 4, "rom"),
        Write(0x0C, 1, "cache line size"),
        Write(0x0D, 1, "latency timer"),
        Write(0x3C, 1, "interrupt line"),
    ]
    bodies: list[Write] = []
    enables: list[Write] = []
    for cap_id, at in _capabilities(space):
        if cap_id == _CAP_MSI:
            control = int.from_bytes(space[at + 2 : at + 4], "little")
            is64, masking = bool(control & 0x80), bool(control & 0x100)
            bodies.append(Write(at + 4, 4, "msi address"))
            data_at = at + 8
            if is64:
                bodies.append(Write(at + 8, 4, "msi upper address"))
                data_at = at + 12
            bodies.append(Write(data_at, 2, "msi data"))
            if masking:
                bodies.append(Write(data_at + 4, 4, "msi mask"))
            enables.append(Write(at + 2, 2, "msi control"))
        elif cap_id == _CAP_MSIX:
            enables.append(Write(at + 2, 2, "msi-x control"))
        elif cap_id == _CAP_PM:
            enables.append(Write(at + 4, 2, "pm control/status"))
        elif cap_id == _CAP_EXP:
            bodies += [
                Write(at + 8, 2, "pcie device control"),
                Write(at + 0x10, 2, "pcie link control"),
                Write(at + 0x28, 2, "pcie device control 2"),
            ]
        elif cap_id == _CAP_VENDOR:
            length = space[at + 2]
            if length > 3 and at + length <= len(space):
                bodies.append(Write(at + 3, length - 3, "vendor capability"))
    plan = [*header, *bodies, *enables, Write(0x04, 2, "command")]
    return [w for w in plan if w.offset + w.size <= len(space)]


def _capabilities(space: bytes) -> list[tuple[int, int]]:
    """``(id, offset)`` of each capability in the standard list (loops and pointers
    outside the 256-byte header area end the walk)."""
    if len(space) < 256 or not space[0x06] & 0x10:
        return []
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    at = space[0x34] & 0xFC
    while 0x40 <= at <= 0xFC and at not in seen and len(out) < 48:
        seen.add(at)
        out.append((space[at], at))
        at = space[at + 1] & 0xFC
    return out


async def read_config_space(client: VfioUserClient) -> bytes | None:
    """The device's PCI config space (region 7), or None for a device that is not PCI or
    refuses to say (logged: its config space does not travel)."""
    try:
        info = await client.device_info()
    except VfioUserCommandError as exc:
        log.warning(
            "vfio-user %s: pci config space not carried: %s",
            client.path,
            exc,
            extra=event("vfio_user_config_not_carried", reason=str(exc)),
        )
        return None
    if not info.flags & DEVICE_FLAGS_PCI or info.num_regions <= CONFIG_REGION:
        return None
    region = await client.region_info(CONFIG_REGION)
    if region.size not in (256, MAX_SIZE):
        raise ConfigStateError(
            f"vfio-user {client.path}: pci config space of {region.size} bytes (256 or {MAX_SIZE})"
        )
    return await client.region_read(CONFIG_REGION, 0, region.size)


async def replay_config_space(client: VfioUserClient, space: bytes) -> int:
    """Write ``space``'s writable state into the device (`replay_plan` order); the number
    of registers written.

    Raises:
        ConfigStateError: the device's config space has another size.
        VfioUserCommandError: a write was refused (the text names the register).
    """
    region = await client.region_info(CONFIG_REGION)
    if region.size != len(space):
        raise ConfigStateError(
            f"vfio-user {client.path}: pci config space of {region.size} bytes, "
            f"the migrated one has {len(space)}"
        )
    plan = replay_plan(space)
    for write in plan:
        data = space[write.offset : write.offset + write.size]
        await client.region_write(CONFIG_REGION, write.offset, data, what=f"config {write.what}")
    return len(plan)
