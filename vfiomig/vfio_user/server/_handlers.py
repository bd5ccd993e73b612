"""The per-command rules of the server (libvfio-user's ``handle_*``), sans-IO.

Each handler checks every length, offset, count, index and flag before use, and raises
``OSError(errno)`` for the error reply. Reply sizes are libvfio-user's to the byte: its
client reads replies with MSG_WAITALL into buffers sized for them, so a reply longer or
shorter than libvfio-user's would break its framing. The region commands' rules are in
`_region_handlers`.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Final

from vfiomig.vfio_user._header import MAJOR, Command, ProtocolError
from vfiomig.vfio_user._layouts import (
    BITMAP,
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    DEVICE_INFO,
    DMA_MAP,
    DMA_UNMAP,
    FEATURE_DMA_LOGGING_REPORT,
    FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP,
    IRQ_INFO,
    LOGGING_CONTROL,
    LOGGING_RANGE,
    LOGGING_REPORT,
    UNMAP_FLAG_ALL,
    UNMAP_FLAG_GET_DIRTY_BITMAP,
    DmaMap,
    DmaUnmap,
    IrqSet,
    bitmap_size,
    unpack,
)
from vfiomig.vfio_user._migration_bodies import (
    FEATURE_GET,
    FEATURE_MASK,
    FEATURE_MIG_DEVICE_STATE,
    FEATURE_MIGRATION,
    FEATURE_PROBE,
    FEATURE_SET,
    NO_DATA_FD,
)
from vfiomig.vfio_user._version import Capabilities, MigrationCaps, Version
from vfiomig.vfio_user.server._device import VfioUserDevice
from vfiomig.vfio_user.server._region_handlers import (
    region_info,
    region_io_fds,
    region_read,
    region_write,
    region_write_multi,
)
from vfiomig.vfio_user.server._session import (
    CLIENT_MAX_FDS_LIMIT,
    MINOR,
    CloseConnection,
    Reply,
    ResetReason,
    Session,
)

_HEAD: Final = struct.Struct("=II")  # argsz, flags (DEVICE_FEATURE) / argsz, size (MIG_DATA)
_STATE: Final = struct.Struct("=II")
_U64: Final = struct.Struct("=Q")

#: Commands executed while the device is in STOP or STOP_COPY (libvfio-user).
ALLOWED_WHEN_STOPPED: Final = frozenset(
    {
        Command.REGION_READ,
        Command.REGION_WRITE,
        Command.REGION_WRITE_MULTI,
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
    }
)


_QUIESCE_COMMANDS: Final = frozenset({Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_RESET})


def _einval(text: str) -> OSError:
    return OSError(errno.EINVAL, text)


def _reply(*parts: bytes | bytearray | memoryview, fds: list[int] | None = None) -> Reply:
    return Reply(list(parts), fds or [])


def handle(
    dev: VfioUserDevice, session: Session, command: int, payload: memoryview, fds: list[int]
) -> Reply:
    """Execute one request to ``dev``. The handler takes the fds it keeps out of ``fds``
    (the caller closes what is left); the reply's ``parts`` may view ``payload``.

    Raises:
        OSError: the errno to answer with.
        CloseConnection: answer, then drop the client.
    """
    if not session.negotiated:
        return _version(dev, session, command, payload, fds)
    if command == Command.VERSION:
        raise _einval("a second VERSION")
    migration = dev.migration
    if migration is not None and migration.stopped and command not in ALLOWED_WHEN_STOPPED:
        raise _einval(f"command {command} in {migration.state.name}")
    handler = _HANDLERS.get(command)
    if handler is None:
        raise _einval(f"command {command} is not supported")
    try:
        return handler(dev, session, payload, fds)
    except ProtocolError as exc:  # a short payload
        raise _einval(exc.message) from None


def needs_quiesce(dev: VfioUserDevice, session: Session, command: int, payload: memoryview) -> bool:
    """Whether the request changes what a running emulator depends on, so that it must
    be quiet first (libvfio-user's ``should_quiesce``): DMA_MAP, DMA_UNMAP, DEVICE_RESET
    and a DEVICE_FEATURE SET of the migration state."""
    if dev.quiesce_callback is None or not session.negotiated:
        return False
    if command in _QUIESCE_COMMANDS:
        return True
    if command == Command.DEVICE_FEATURE and len(payload) >= _HEAD.size:
        flags: int = _HEAD.unpack_from(payload)[1]
        return flags & FEATURE_SET != 0 and flags & FEATURE_MASK == FEATURE_MIG_DEVICE_STATE
    return False


def _version(
    dev: VfioUserDevice, session: Session, command: int, payload: memoryview, fds: list[int]
) -> Reply:
    # libvfio-user's tran_negotiate: the first message must be a good VERSION, or the
    # client gets EINVAL and is dropped.
    if command != Command.VERSION or fds:
        raise CloseConnection(
            errno.EINVAL, f"first message is command {command} with {len(fds)} fds, not VERSION"
        )
    try:
        req = Version.unpack(payload)
    except ProtocolError as exc:
        raise CloseConnection(errno.EINVAL, exc.message) from None
    caps = req.capabilities or Capabilities()
    if req.major != MAJOR:
        raise CloseConnection(errno.EINVAL, f"version major {req.major} (ours {MAJOR})")
    if caps.max_msg_fds is not None and caps.max_msg_fds > CLIENT_MAX_FDS_LIMIT:
        raise CloseConnection(
            errno.EINVAL, f"client max_msg_fds {caps.max_msg_fds} (max {CLIENT_MAX_FDS_LIMIT})"
        )
    session.client_max_data_xfer_size = caps.data_xfer_limit
    session.client_max_msg_fds = 1 if caps.max_msg_fds is None else caps.max_msg_fds
    session.negotiated = True
    dev.dma.client_max_xfer = session.client_max_data_xfer_size
    mig = None
    if dev.migration is not None:
        mig = MigrationCaps(pgsize=dev.pgsize, max_bitmap_size=dev.max_bitmap_size)
    ours = Capabilities(
        max_msg_fds=dev.max_msg_fds,
        max_data_xfer_size=dev.max_data_xfer_size,
        pgsizes=dev.pgsize,
        migration=mig,
        write_multiple=True,
    )
    return _reply(Version(MAJOR, min(req.minor, MINOR), ours).pack())


# --------------------------------------------------------------------------- info


def _device_info(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]
) -> Reply:
    argsz = unpack(DEVICE_INFO, payload, "device info")[0]
    if argsz < DEVICE_INFO.size:
        raise _einval(f"device info argsz {argsz} (min {DEVICE_INFO.size})")
    flags = DEVICE_FLAGS_RESET | (DEVICE_FLAGS_PCI if dev.pci is not None else 0)
    return _reply(DEVICE_INFO.pack(DEVICE_INFO.size, flags, dev.num_regions, 5))


def _irq_info(dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]) -> Reply:
    argsz, _flags, index, _count = unpack(IRQ_INFO, payload, "irq info")
    if argsz < IRQ_INFO.size:
        raise _einval(f"irq info argsz {argsz} (min {IRQ_INFO.size})")
    flags, count = dev.irqs.info(index)
    return _reply(IRQ_INFO.pack(IRQ_INFO.size, flags, index, count))


def _set_irqs(dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]) -> Reply:
    req = IrqSet.unpack(payload)
    given = list(fds)
    released = dev.irqs.set_irqs(req, given)
    kept = set(given) - set(released)
    fds[:] = [fd for fd in fds if fd not in kept] + [fd for fd in released if fd not in given]
    return _reply()


# --------------------------------------------------------------------------- DMA


def _dma_map(dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]) -> Reply:
    req = DmaMap.unpack(payload)
    if req.argsz < DMA_MAP.size:
        raise _einval(f"dma map argsz {req.argsz} (min {DMA_MAP.size})")
    if len(fds) > 1:
        raise _einval(f"dma map with {len(fds)} fds (max 1)")
    dev.dma.map(req.addr, req.size, req.offset, req.flags, fds[0] if fds else None)
    return _reply()


def _dma_unmap(dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]) -> Reply:
    req = DmaUnmap.unpack(payload)
    head = payload[: DMA_UNMAP.size]
    what = f"dma unmap {req.addr:#x}+{req.size:#x} flags {req.flags:#x}"
    if req.flags not in (0, UNMAP_FLAG_ALL, UNMAP_FLAG_GET_DIRTY_BITMAP):
        raise _einval(f"{what}: unknown flags")
    min_argsz = DMA_UNMAP.size
    if req.bitmap is not None:
        pgsize, size = req.bitmap
        if size > dev.max_bitmap_size:
            raise _einval(f"{what}: bitmap size {size} (max {dev.max_bitmap_size})")
        min_argsz += BITMAP.size + size
    if not min_argsz <= req.argsz <= dev.max_data_xfer_size + DMA_UNMAP.size + BITMAP.size:
        raise _einval(f"{what}: argsz {req.argsz} (min {min_argsz})")
    if req.flags == UNMAP_FLAG_ALL:
        if req.addr or req.size:
            raise _einval(f"{what}: ALL with a range")
        dev.dma.unmap_all()
        return _reply(head)
    region = dev.dma.find_exact(req.addr, req.size)
    if req.bitmap is None:
        dev.dma.unmap(region)
        return _reply(head)
    pgsize, size = req.bitmap
    bitmap = dev.dma.dirty_bitmap(req.addr, req.size, pgsize, size)
    dev.dma.unmap(region)
    return _reply(head, BITMAP.pack(pgsize, size), bitmap)


def _reset(dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]) -> Reply:
    dev.do_reset(ResetReason.DEVICE_RESET)
    return _reply()


# --------------------------------------------------------------------------- DEVICE_FEATURE

_OPS: Final = {
    FEATURE_MIGRATION: FEATURE_GET | FEATURE_PROBE,
    FEATURE_MIG_DEVICE_STATE: FEATURE_GET | FEATURE_SET | FEATURE_PROBE,
    FEATURE_DMA_LOGGING_START: FEATURE_SET | FEATURE_PROBE,
    FEATURE_DMA_LOGGING_STOP: FEATURE_SET | FEATURE_PROBE,
    FEATURE_DMA_LOGGING_REPORT: FEATURE_GET | FEATURE_PROBE,
}


def _feature(dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]) -> Reply:
    argsz, flags = unpack(_HEAD, payload, "device feature")
    feature, ops = flags & FEATURE_MASK, flags & ~FEATURE_MASK
    supported = _OPS.get(feature, 0) if dev.migration is not None else 0
    if not supported or flags & supported != ops:
        raise _einval(f"device feature {feature} flags {flags:#x} (supported {supported:#x})")
    data = payload[_HEAD.size :]
    if ops == FEATURE_GET:
        return _feature_get(dev, argsz, flags, data)
    if ops != FEATURE_SET and not ops & FEATURE_PROBE:
        raise _einval(f"device feature {feature} flags {flags:#x}: no single operation")
    if argsz < len(payload):
        raise _einval(f"device feature {feature} argsz {argsz} (min {len(payload)})")
    if ops == FEATURE_SET:
        _feature_set(dev, feature, data)
    return _reply(payload)


def _feature_get(dev: VfioUserDevice, argsz: int, flags: int, data: memoryview) -> Reply:
    assert dev.migration is not None
    feature = flags & FEATURE_MASK
    if feature == FEATURE_DMA_LOGGING_REPORT:
        iova, length, pgsize = unpack(LOGGING_REPORT, data, "dma logging report")
        if pgsize == 0 or length < pgsize or length > 1 << 63:
            raise _einval(f"dma logging report {iova:#x}+{length:#x} page {pgsize:#x}")
        size = bitmap_size(length, pgsize)
        total = _HEAD.size + LOGGING_REPORT.size + size
        if argsz < total or size > dev.max_data_xfer_size:
            raise _einval(f"dma logging report argsz {argsz} (min {total})")
        bitmap = dev.dma.dirty_bitmap(iova, length, pgsize, size)
        return _reply(_HEAD.pack(total, flags), data[: LOGGING_REPORT.size], bitmap)
    total = _HEAD.size + 8
    if argsz < total:
        raise _einval(f"device feature {feature} argsz {argsz} (min {total})")
    if feature == FEATURE_MIGRATION:
        return _reply(_HEAD.pack(total, flags), _U64.pack(dev.migration.flags))
    return _reply(_HEAD.pack(total, flags), _STATE.pack(dev.migration.state, NO_DATA_FD))


def _feature_set(dev: VfioUserDevice, feature: int, data: memoryview) -> None:
    assert dev.migration is not None
    if feature == FEATURE_MIG_DEVICE_STATE:
        dev.migration.set_state(unpack(_STATE, data, "device state")[0])
    elif feature == FEATURE_DMA_LOGGING_START:
        pgsize, nranges, _ = unpack(LOGGING_CONTROL, data, "dma logging control")
        room = (len(data) - LOGGING_CONTROL.size) // LOGGING_RANGE.size
        if nranges > room:
            raise _einval(f"dma logging start with {nranges} ranges (carries {room})")
        ranges = [
            LOGGING_RANGE.unpack_from(data, LOGGING_CONTROL.size + i * LOGGING_RANGE.size)
            for i in range(nranges)
        ]
        dev.dma.logging_start(pgsize, ranges)
    else:
        dev.dma.logging_stop()


# --------------------------------------------------------------------------- MIG_DATA


def _mig_data_read(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]
) -> Reply:
    argsz, size = unpack(_HEAD, payload, "mig data read")
    if dev.migration is None:
        raise _einval("mig data read: no migration")
    if size > session.client_max_data_xfer_size or size > dev.max_data_xfer_size:
        raise _einval(
            f"mig data read size {size} (max {min(session.client_max_data_xfer_size, dev.max_data_xfer_size)})"
        )
    if argsz < _HEAD.size + size:
        raise _einval(f"mig data read argsz {argsz} (min {_HEAD.size + size})")
    data = dev.migration.read(size)
    pad = len(payload) - _HEAD.size + size - len(data)  # libvfio-user's reply size
    return _reply(_HEAD.pack(_HEAD.size + len(data), len(data)), data, bytes(pad))


def _mig_data_write(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]
) -> Reply:
    argsz, size = unpack(_HEAD, payload, "mig data write")
    if dev.migration is None:
        raise _einval("mig data write: no migration")
    carried = len(payload) - _HEAD.size
    problem = mig_data_write_error(argsz, size, carried, session.client_max_data_xfer_size)
    if problem is not None:
        raise _einval(problem)
    dev.migration.write(payload[_HEAD.size : _HEAD.size + size])
    return _reply()


def mig_data_write_error(argsz: int, size: int, carried: int, client_max: int) -> str | None:
    """Why a MIG_DATA_WRITE's arguments are refused with EINVAL, or None: ``size`` data
    bytes said, ``carried`` bytes after its argsz/size head, ``client_max`` the client's
    transfer limit. The one rule for the handler and the receive path straight into the
    emulator (`vfiomig.vfio_user.server._connection`)."""
    if size > client_max:
        return f"mig data write size {size} (max {client_max})"
    if argsz < _HEAD.size + size or carried < size:
        return f"mig data write size {size} argsz {argsz} carries {carried}"
    return None


_Handler = Callable[["VfioUserDevice", Session, memoryview, list[int]], Reply]
_HANDLERS: Final[dict[int, _Handler]] = {
    Command.DEVICE_GET_INFO: _device_info,
    Command.DEVICE_GET_REGION_INFO: region_info,
    Command.DEVICE_GET_REGION_IO_FDS: region_io_fds,
    Command.DEVICE_GET_IRQ_INFO: _irq_info,
    Command.DEVICE_SET_IRQS: _set_irqs,
    Command.REGION_READ: region_read,
    Command.REGION_WRITE: region_write,
    Command.REGION_WRITE_MULTI: region_write_multi,
    Command.DMA_MAP: _dma_map,
    Command.DMA_UNMAP: _dma_unmap,
    Command.DEVICE_RESET: _reset,
    Command.DEVICE_FEATURE: _feature,
    Command.MIG_DATA_READ: _mig_data_read,
    Command.MIG_DATA_WRITE: _mig_data_write,
}
