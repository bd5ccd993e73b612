"""vfiomig's vfio-user source and sink against libvfio-user's own ``samples/server``.

The sample's migration stream is BAR1 (0x3000 bytes) then BAR0 (an 8-byte ``time_t``); a
fresh server's is all zeros. Each sample server serves one client and exits 0 when it goes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.libvfio_user import LibVfioUser
from vfiomig._core._wire import wrap_config
from vfiomig.vfio_user import VfioUserCommandError, VfioUserSink, VfioUserSource

STREAM = 0x3000 + 8


def listening(path: str) -> bool:
    """The UNIX socket at ``path`` listens (its file appears a moment before it does, and
    a probe connection would be the sample's one client)."""
    with open("/proc/net/unix") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


@contextmanager
def sample_servers(lvu: LibVfioUser, count: int) -> Iterator[list[str]]:
    with tempfile.TemporaryDirectory(prefix="vul", dir="/tmp") as tmp:
        paths = [os.path.join(tmp, f"s{i}") for i in range(count)]
        procs = []
        for path in paths:
            with open(f"{path}.log", "w") as log:
                procs.append(
                    subprocess.Popen(
                        [str(lvu.server), "-v", path],
                        env=lvu.env(),
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                )
        try:
            deadline = time.monotonic() + 20
            while not all(listening(p) for p in paths):
                assert time.monotonic() < deadline, "libvfio-user's server did not start"
                time.sleep(0.02)
            yield paths
            for proc, path in zip(procs, paths, strict=True):
                assert proc.wait(timeout=20) == 0, Path(f"{path}.log").read_text()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


async def test_source_and_sink_migrate_between_two_libvfio_user_servers(
    libvfio_user: LibVfioUser,
) -> None:
    with sample_servers(libvfio_user, 2) as (src_path, dst_path):
        source, sink = VfioUserSource(src_path), VfioUserSink(dst_path)
        moved = bytearray()
        with trio.fail_after(20):
            try:
                await source.start()
                await sink.start()
                while data := await source.read(1000):
                    moved += data
                    await sink.write([data])
                assert await source.config_blob() == wrap_config(b"")
                await source.finish()  # STOP: the sample checks it sent the whole stream
                await sink.finish()  # STOP after RESUMING: the sample took every byte
            finally:
                await source.aclose()
                await sink.aclose()
    assert moved == bytes(STREAM)


async def test_sink_stream_longer_than_the_device_takes_fails(
    libvfio_user: LibVfioUser,
) -> None:
    with sample_servers(libvfio_user, 1) as (path,):
        sink = VfioUserSink(path)
        with trio.fail_after(20):
            try:
                await sink.start()
                await sink.write([os.urandom(STREAM)])
                with pytest.raises(VfioUserCommandError, match="errno 22"):
                    await sink.write([b"one byte too many"])
                    await sink.finish()
            finally:
                await sink.abort()
                await sink.aclose()
