"""The fast fake kernel VFIO device read alone: `compare_send`'s "read" for a ``vfio`` case.

    python -m benchmarks.fake_vfio_read SIZE [SEED]

Builds the device `compare_send` sends from (`vfiomig.testing.FakeVfioDevice` with a
``fed`` saving model: its STOP_COPY data fd a real UNIX socket that a thread of this
process feeds with SIZE bytes; STOP_COPY only, nothing kept), enters STOP_COPY through
`VfioSource` as ``vfiomig send`` does, then reads the data fd to its end (read() returning
0) into one reused 1 MiB buffer, as a C reader thread would, timing that. Prints
{"bytes", "seconds", "cpu_s"} (cpu_s: this process's CPU seconds while reading, the
feeding thread's included, as in the sender's process).
"""

from __future__ import annotations

import json
import os
import sys
import time

import trio

from vfiomig.testing import FakeVfioDevice
from vfiomig.testing._fake_saving import SavingModel
from vfiomig.vfio import VfioSource
from vfiomig.vfio._uapi import VFIO_MIGRATION_P2P, VFIO_MIGRATION_STOP_COPY


async def read_alone(size: int, seed: int) -> dict[str, float | int]:
    model = SavingModel(stop_copy=size, seed=seed, fed=True, keep=False)
    flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P
    with FakeVfioDevice(flags=flags, saving=model) as fake:
        source = VfioSource.from_device_fd(fake.open(), owned=True, ioctl=fake.ioctl)
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            await source.start()
            stream = source.native_stream()
            assert stream is not None
            fd = int(stream[1])  # type: ignore[call-overload]
            buf = bytearray(1 << 20)
            got = 0
            while n := os.readv(fd, [buf]):
                got += n
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            await source.finish()
        finally:
            await source.aclose()
    return {"bytes": got, "seconds": round(seconds, 6), "cpu_s": round(cpu, 3)}


def main(argv: list[str]) -> int:
    size = int(argv[0])
    seed = int(argv[1]) if len(argv) > 1 else 1
    print(json.dumps(trio.run(read_alone, size, seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
