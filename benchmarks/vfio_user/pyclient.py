"""vfiomig's vfio-user sink or source against a server, timing the data phase.

    python benchmarks/vfio_user/pyclient.py SOCK write MAX_WRITE TOTAL WINDOW   # bytes
    python benchmarks/vfio_user/pyclient.py SOCK read 0 0 WINDOW

Uses only `VfioUserSink` / `VfioUserSource` as the receive and send paths do (writes of
16 MiB batches of 1 MiB chunks, as the loader hands them over; reads of 1 MiB, as the
sender asks), so the same script runs against an older checkout (PYTHONPATH) for the
baseline. WINDOW 0 means the sink's default. Prints {"mib_s", "seconds", "bytes", "cpu_s"}
(cpu_s: this process's CPU seconds in the data phase).
"""

from __future__ import annotations

import json
import sys
import time

import trio

from vfiomig.vfio_user import VfioUserSink, VfioUserSource

CHUNK = 1 << 20

BATCH = 16
CPU: list[float] = []  # the data phase's CPU seconds (user + sys)


async def write(path: str, max_write: int, total: int, window: int) -> tuple[float, int]:
    kwargs = {"window": window} if window else {}
    sink = VfioUserSink(path, max_write=max_write, **kwargs)
    await sink.start()
    chunk = memoryview(b"\x5a" * CHUNK)
    t0 = time.perf_counter()
    c0 = time.process_time()
    for _ in range(total // (CHUNK * BATCH)):
        await sink.write([chunk] * BATCH)
    await sink.client.flush()
    seconds = time.perf_counter() - t0
    CPU.append(time.process_time() - c0)
    await sink.finish()
    await sink.aclose()
    return seconds, total


async def read(path: str, window: int) -> tuple[float, int]:
    kwargs = {"window": window} if window else {}
    try:
        source = VfioUserSource(path, **kwargs)  # type: ignore[arg-type]
    except TypeError:  # an older checkout without a window
        source = VfioUserSource(path)
    await source.start()
    moved = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    while data := await source.read(CHUNK):
        moved += len(data)
    seconds = time.perf_counter() - t0
    CPU.append(time.process_time() - c0)
    await source.finish()
    await source.aclose()
    return seconds, moved


def main() -> None:
    path, mode, max_write, total, window = sys.argv[1:6]
    if mode == "write":
        run = write(path, int(max_write), int(total), int(window))
    else:
        run = read(path, int(window))
    seconds, moved = trio.run(lambda: run)
    print(
        json.dumps(
            {
                "mib_s": round(moved / seconds / 2**20, 1),
                "seconds": round(seconds, 4),
                "bytes": moved,
                "cpu_s": round(CPU[0], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
