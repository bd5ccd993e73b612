"""Replies sized as libvfio-user sizes them: its ``samples/server`` and our port of it
(``examples/vfio_user_sample_server.py``) asked the same questions over real sockets.

libvfio-user's own client reads replies with MSG_WAITALL into buffers sized for them,
so the server library claims reply sizes byte-identical to libvfio-user's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from tests.libvfio_user import LibVfioUser
from tests.vfio_user_raw import RawClient
from vfiomig.vfio_user._header import Command
from vfiomig.vfio_user._layouts import REGION_INFO

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vfio_user_sample_server.py"


async def region_info_replies(path: str) -> list[tuple[int, int, int, int, int]]:
    """(reply bytes, argsz, flags, index, size) for regions 0, 1 (BAR1: sparse mmap caps),
    2 (absent) and 7 (config) at argsz from the bare struct to past the caps."""
    out = []
    with trio.fail_after(20):
        raw = await RawClient.connect(path)
        try:
            for index in (0, 1, 2, 7):
                for argsz in (32, 36, 40, 48, 63, 64, 65, 200):
                    info = REGION_INFO.pack(argsz, 0, index, 0, 0, 0)
                    got = await raw.call(Command.DEVICE_GET_REGION_INFO, info)
                    assert not got.is_error, (index, argsz, got)
                    for fd in got.fds:
                        os.close(fd)
                    head = REGION_INFO.unpack_from(got.payload)
                    out.append((len(got.payload), head[0], head[1], head[2], head[4]))
        finally:
            raw.close()
    return out


def test_region_info_reply_sizes_match_libvfio_users(libvfio_user: LibVfioUser) -> None:
    with tempfile.TemporaryDirectory(prefix="vur", dir="/tmp") as tmp:
        c_path, py_path = Path(tmp) / "c.sock", Path(tmp) / "py.sock"
        c_server = libvfio_user.sample_server(c_path)
        py_server = subprocess.Popen([sys.executable, str(EXAMPLE), str(py_path)])
        try:
            deadline = time.monotonic() + 20
            while not py_path.exists():  # it links the path once it listens
                assert py_server.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            theirs = trio.run(region_info_replies, str(c_path))
            ours = trio.run(region_info_replies, str(py_path))
        finally:
            for proc in (c_server, py_server):
                if proc.poll() is None:
                    proc.kill()
                proc.communicate(timeout=10)
    assert ours == theirs
    bar1_at_40 = theirs[1 * 8 + 2]
    assert bar1_at_40[:2] == (40, 32 + 16 + 2 * 16)  # 40 bytes: the caps did not fit
