"""What GET_REGION_IO_FDS hands a VMM: a region's ioeventfds (`RegionIoFd`), parsed from
the reply with every index and length checked (`parse_io_fds`)."""

from __future__ import annotations

from dataclasses import dataclass

from vfiomig.vfio_user._header import ProtocolError
from vfiomig.vfio_user._layouts import (
    IO_FD_FLAG_DATAMATCH,
    IO_FD_TYPE_IOEVENTFD,
    IO_FDS,
    SUB_REGION_IOEVENTFD,
)


@dataclass(frozen=True, slots=True)
class RegionIoFd:
    """One ioeventfd of a region: a guest write of ``size`` bytes at ``offset`` (of
    ``datamatch`` only, if set) is to signal ``fd`` instead of becoming a REGION_WRITE
    (a VMM registers it with KVM). ``fd`` belongs to the client (closed with it);
    several entries may share one fd, as the device made them."""

    offset: int
    size: int
    fd: int
    datamatch: int | None


def parse_io_fds(index: int, data: bytes, fds: list[int]) -> list[RegionIoFd]:
    """The entries of a GET_REGION_IO_FDS reply for region ``index`` with its ``fds``.

    Raises:
        ProtocolError: a short reply, another region's, an unknown type, or an fd index
            past the fds that came.
    """
    if len(data) < IO_FDS.size:
        raise ProtocolError(f"region {index} io fds reply of {len(data)} bytes")
    _, _, got_index, count = IO_FDS.unpack_from(data)
    if got_index != index:
        raise ProtocolError(f"region {index} io fds: reply is for region {got_index}")
    if len(data) < IO_FDS.size + count * SUB_REGION_IOEVENTFD.size:
        raise ProtocolError(
            f"region {index} io fds reply of {len(data)} bytes for {count} sub-regions"
        )
    out = []
    for i in range(count):
        offset, size, fd_index, kind, flags, _, _, datamatch = SUB_REGION_IOEVENTFD.unpack_from(
            data, IO_FDS.size + i * SUB_REGION_IOEVENTFD.size
        )
        if kind != IO_FD_TYPE_IOEVENTFD or fd_index >= len(fds):
            raise ProtocolError(
                f"region {index} io fd {i}: type {kind}, fd index {fd_index} of {len(fds)} fds"
            )
        match = datamatch if flags & IO_FD_FLAG_DATAMATCH else None
        out.append(RegionIoFd(offset, size, fds[fd_index], match))
    return out
