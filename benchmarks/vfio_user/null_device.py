"""vfiomig's own vfio-user server with an emulator whose stream has no fixed size.

    python -m benchmarks.vfio_user.null_device SOCK READ_TOTAL

``write_data`` copies each MIG_DATA_WRITE into a 4 MiB ring (a device that stores its
state); ``read_data`` returns READ_TOTAL bytes in STOP_COPY, then 0. Same device as the
C ``vu_server.c`` on libvfio-user, so the two servers compare.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from vfiomig._specs import parse_size
from vfiomig.vfio_user import MigState, VfioUserDevice, serve_vfio_user

RING = 4 << 20


class NullEmulator:
    def __init__(self, read_total: int) -> None:
        self.read_total = read_total
        self.ring = bytearray(b"\xa5" * RING)
        self.view = memoryview(self.ring)
        self.written = 0
        self.read = 0

    @property
    def region_sizes(self) -> Sequence[int]:
        return ()

    def transition(self, state: MigState) -> None:
        if state == MigState.STOP_COPY:
            self.read = 0

    def read_data(self, size: int) -> bytes:
        n = min(size, self.read_total - self.read)
        off = self.read % RING
        first = min(n, RING - off)
        data = bytes(self.view[off : off + first]) + bytes(self.view[: n - first])
        self.read += n
        return data

    def write_data(self, data: memoryview) -> int:
        n = len(data)
        off = self.written % RING
        first = min(n, RING - off)
        self.view[off : off + first] = data[:first]
        self.view[: n - first] = data[first:]
        self.written += n
        return n

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        raise OSError(22, "no regions")

    def region_write(self, index: int, offset: int, data: memoryview) -> int:
        raise OSError(22, "no regions")

    def reset(self) -> None:
        pass


def main() -> None:
    sock, total = sys.argv[1], parse_size(sys.argv[2])
    trio.run(serve_vfio_user, sock, VfioUserDevice(NullEmulator(total)))


if __name__ == "__main__":
    main()
