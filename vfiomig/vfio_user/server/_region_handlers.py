"""The region commands' rules (libvfio-user's ``handle_device_get_region_info``,
``..._io_fds``, ``handle_region_access``), sans-IO like the rest of `_handlers`, which
dispatches to them: GET_REGION_INFO (sparse mmap areas and the fd of the region's memory),
GET_REGION_IO_FDS (the emulator's ioeventfds), REGION_READ / REGION_WRITE with the fast
path of small register accesses (`region_access_fast`, called by `_connection` without
the dispatch) and REGION_WRITE_MULTI.
"""

from __future__ import annotations

import errno
import struct
from typing import Final

from vfiomig.vfio_user._header import HEADER_SIZE
from vfiomig.vfio_user._layouts import (
    IO_FD_FLAG_DATAMATCH,
    IO_FD_TYPE_IOEVENTFD,
    IO_FDS,
    MULTI_COUNT,
    MULTI_MAX,
    MULTI_ONE,
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    REGION_INFO,
    SUB_REGION_IOEVENTFD,
    sparse_mmap_cap,
    sparse_mmap_cap_size,
    unpack,
)
from vfiomig.vfio_user._migration_bodies import MigState
from vfiomig.vfio_user.server._device import VfioUserDevice
from vfiomig.vfio_user.server._regions import Buffer
from vfiomig.vfio_user.server._session import Reply, Session

_ACCESS: Final = struct.Struct("=QII")  # offset, region, count
_FAST_MIN: Final = HEADER_SIZE + _ACCESS.size


def _einval(text: str) -> OSError:
    return OSError(errno.EINVAL, text)


def _reply(*parts: bytes | bytearray | memoryview, fds: list[int] | None = None) -> Reply:
    return Reply(list(parts), fds or [])


def region_info(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]
) -> Reply:
    argsz, _flags, index = unpack(REGION_INFO, payload, "region info")[:3]
    if argsz < REGION_INFO.size:
        raise _einval(f"region info argsz {argsz} (min {REGION_INFO.size})")
    if index >= dev.num_regions:
        raise _einval(f"region info index {index} (max {dev.num_regions - 1})")
    region = dev.regions.get(index)
    if region is None or region.size == 0:
        return _reply(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
    flags = region.flags
    mappable = region.memory is not None and bool(region.areas) and session.client_max_msg_fds >= 1
    caps = sparse_mmap_cap_size(len(region.areas)) if mappable else 0
    full = REGION_INFO.size + caps
    if not mappable or argsz < full:
        if mappable:
            flags |= REGION_FLAG_MMAP
        head = REGION_INFO.pack(full, flags, index, 0, region.size, 0)
        # libvfio-user answers min(full, argsz) bytes, zeros where the caps did not fit.
        return _reply(head, bytes(min(full, argsz) - REGION_INFO.size))
    assert region.memory is not None
    head = REGION_INFO.pack(
        full,
        flags | REGION_FLAG_MMAP | REGION_FLAG_CAPS,
        index,
        REGION_INFO.size,
        region.size,
        region.memory.offset,
    )
    return _reply(head, sparse_mmap_cap(region.areas), fds=[region.memory.fd])


def region_io_fds(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]
) -> Reply:
    # libvfio-user's handle_device_get_region_io_fds: the sub-regions and their fds when
    # argsz has room for all of them, else only the argsz needed and the count.
    argsz, flags, index, count = unpack(IO_FDS, payload, "region io fds")
    if flags or count:
        raise _einval(f"region io fds flags {flags:#x} count {count} (both 0)")
    region = dev.regions.get(index) if index < dev.num_regions else None
    if region is None or not region.flags:
        raise _einval(f"region io fds index {index} is not a region")
    if not IO_FDS.size <= argsz <= dev.max_data_xfer_size:
        raise _einval(f"region io fds argsz {argsz} (min {IO_FDS.size})")
    subs = region.ioeventfds
    full = IO_FDS.size + len(subs) * SUB_REGION_IOEVENTFD.size
    head = IO_FDS.pack(full, 0, index, len(subs))
    if not subs or argsz < full:
        return _reply(head)
    out_fds: list[int] = []
    parts: list[bytes] = [head]
    for sub in subs:
        if sub.fd not in out_fds:
            out_fds.append(sub.fd)
        match = sub.datamatch is not None
        parts.append(
            SUB_REGION_IOEVENTFD.pack(
                sub.offset,
                sub.size,
                out_fds.index(sub.fd),
                IO_FD_TYPE_IOEVENTFD,
                IO_FD_FLAG_DATAMATCH if match else 0,
                0,
                0,
                sub.datamatch or 0,
            )
        )
    if len(out_fds) > session.client_max_msg_fds:
        raise _einval(
            f"region io fds index {index}: {len(out_fds)} fds "
            f"(the client takes {session.client_max_msg_fds})"
        )
    return _reply(*parts, fds=out_fds)


def _region_access(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int], write: bool
) -> Reply:
    # The hot path of an emulator: checks first, error text only when one fails.
    if len(payload) < _ACCESS.size:
        raise _einval(f"region access payload of {len(payload)} bytes (min {_ACCESS.size})")
    offset, index, count = _ACCESS.unpack_from(payload)
    region = dev.regions.get(index) if index < dev.num_regions else None
    carried = len(payload) - _ACCESS.size
    if (
        region is None
        or count > dev.max_data_xfer_size
        or offset + count > region.size
        or (write and carried != count)
        or (dev.migration is not None and dev.migration.state == MigState.STOP_COPY)
    ):
        what = f"region {index} {'write' if write else 'read'} {offset:#x}+{count:#x}"
        if region is None:
            raise _einval(f"{what}: no such region")
        if count > dev.max_data_xfer_size:
            raise _einval(f"{what}: count (max {dev.max_data_xfer_size:#x})")
        if offset + count > region.size:
            raise _einval(f"{what}: past the end ({region.size:#x})")
        if write and carried != count:
            raise _einval(f"{what}: carries {carried} bytes")
        raise _einval(f"{what}: device in STOP_COPY")
    if count == 0:
        return _reply()
    head = payload[: _ACCESS.size]
    if write:
        region.do_write(offset, payload[_ACCESS.size :])
        return Reply([head], [])
    return Reply([head, region.do_read(offset, count)], [])


#: The largest access the fast path takes (a register; larger ones take the full path).
FAST_ACCESS_MAX: Final = 64


def region_access_fast(
    dev: VfioUserDevice, buf: memoryview, at: int, size: int, write: bool
) -> Buffer | None:
    """The hot path of a small REGION_READ / REGION_WRITE whose message (``size`` bytes)
    starts at ``buf[at]``: the data read (empty for a write), or None before any callback
    ran when the request needs the full rules of `handle` (anything unusual or wrong:
    it then gets the same checks and error text as always).

    Raises:
        OSError: the region callback failed (the errno to answer with).
    """
    if size < _FAST_MIN:
        return None
    offset, index, count = _ACCESS.unpack_from(buf, at + HEADER_SIZE)
    region = dev.regions.get(index)
    migration = dev.migration
    if (
        region is None
        or index >= dev.num_regions
        or not 0 < count <= FAST_ACCESS_MAX
        or count > dev.max_data_xfer_size
        or offset + count > region.size
        or (migration is not None and migration.state == MigState.STOP_COPY)
    ):
        return None
    if write:
        if size - _FAST_MIN != count:
            return None
        data = buf[at + _FAST_MIN : at + size]
        try:
            region.do_write(offset, data)
        finally:
            data.release()
        return b""
    if size != _FAST_MIN:
        return None
    return region.do_read(offset, count)


def region_read(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]
) -> Reply:
    return _region_access(dev, session, payload, fds, False)


def region_write(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]
) -> Reply:
    return _region_access(dev, session, payload, fds, True)


def region_write_multi(
    dev: VfioUserDevice, session: Session, payload: memoryview, fds: list[int]
) -> Reply:
    # QEMU's posted writes, batched: each goes through the REGION_WRITE rules, in order;
    # the first that fails stops the rest (its errno is the reply's).
    (count,) = unpack(MULTI_COUNT, payload, "region write multi")
    if not 0 < count <= MULTI_MAX or len(payload) != MULTI_COUNT.size + count * MULTI_ONE.size:
        raise _einval(
            f"region write multi of {count} writes in {len(payload)} bytes (max {MULTI_MAX})"
        )
    for i in range(count):
        offset, index, size, data = MULTI_ONE.unpack_from(
            payload, MULTI_COUNT.size + i * MULTI_ONE.size
        )
        if size > len(data):
            raise _einval(f"region write multi {i}: count {size} (max {len(data)})")
        one = memoryview(_ACCESS.pack(offset, index, size) + data[:size])
        _region_access(dev, session, one, fds, True)
    return _reply()
