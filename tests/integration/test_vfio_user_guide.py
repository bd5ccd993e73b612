"""The code of docs/vfio-user-emulators.md runs: the minimal device and its migration."""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.vfio_user_raw import RawClient
from vfiomig.vfio_user import (
    MigState,
    VfioUserCommandError,
    open_vfio_user_client,
    serve_vfio_user,
)
from vfiomig.vfio_user._header import Command

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "vfio-user-emulators.md"


def guide_namespace() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    runnable = [b for b in blocks if "class " in b]  # the device classes, not the fragments
    namespace: dict[str, Any] = {"__name__": "guide"}
    for block in runnable:
        exec(compile(block, str(GUIDE), "exec"), namespace)
    return namespace


async def test_minimal_device_from_the_guide() -> None:
    ns = guide_namespace()
    counter = ns["Counter"]()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    with tempfile.TemporaryDirectory(prefix="vug", dir="/tmp") as tmp, trio.fail_after(10):
        path = os.path.join(tmp, "s")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_vfio_user, path, counter.device)
            raw = await RawClient.connect(path)
            irqs = struct.pack("=IIIII", 20, 0x24, 1, 0, 1)
            assert await raw.errno_of(Command.DEVICE_SET_IRQS, irqs, [efd]) == 0
            access = struct.pack("=QII", 0, 0, 4)
            assert await raw.errno_of(Command.REGION_WRITE, access + struct.pack("<I", 5)) == 0
            assert os.read(efd, 8) == (1).to_bytes(8, "little")
            got = await raw.call(Command.REGION_READ, access)
            assert got.payload[16:] == struct.pack("<I", 5)
            config = await raw.call(Command.REGION_READ, struct.pack("=QII", 0, 7, 4))
            assert config.payload[16:] == struct.pack("<HH", 0x1234, 0x0001)
            raw.close()
            nursery.cancel_scope.cancel()
    os.close(efd)


async def test_migratable_device_from_the_guide() -> None:
    ns = guide_namespace()
    src, dst = ns["MigratableCounter"](), ns["MigratableCounter"]()
    src.value = 42
    with tempfile.TemporaryDirectory(prefix="vug", dir="/tmp") as tmp, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            paths = [os.path.join(tmp, name) for name in ("src", "dst")]
            await nursery.start(serve_vfio_user, paths[0], src.device)
            await nursery.start(serve_vfio_user, paths[1], dst.device)
            stream = b""
            async with await open_vfio_user_client(paths[0]) as client:
                await client.set_state(MigState.PRE_COPY)
                assert await client.read_data(64) == b""
                await client.set_state(MigState.STOP_COPY)
                while chunk := await client.read_data(2):
                    stream += chunk
                await client.set_state(MigState.STOP)
            async with await open_vfio_user_client(paths[1]) as client:
                await client.set_state(MigState.RESUMING)
                await client.write_data([stream])
                await client.set_state(MigState.RUNNING)
                assert await client.region_read(0, 0, 4) == struct.pack("<I", 42)
                await client.region_write(0, 0, struct.pack("<I", 5))
                # A pause after the migration keeps what the device did since: loading
                # happens when leaving RESUMING, not on every move to STOP.
                await client.set_state(MigState.STOP)
                assert await client.region_read(0, 0, 4) == struct.pack("<I", 47)
                await client.set_state(MigState.RUNNING)
                assert await client.region_read(0, 0, 4) == struct.pack("<I", 47)
                await client.reset()
                assert await client.region_read(0, 0, 4) == bytes(4)
            nursery.cancel_scope.cancel()
    assert stream == struct.pack("<I", 42)


async def test_the_emulators_error_text_is_logged_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A transition that fails with ``OSError(EINVAL, text)``: the client gets EINVAL, the
    device stays in RESUMING, and the operator reads the text in a WARNING line."""
    dst = guide_namespace()["MigratableCounter"]()
    caplog.set_level(logging.DEBUG, "vfiomig")
    with tempfile.TemporaryDirectory(prefix="vug", dir="/tmp") as tmp, trio.fail_after(10):
        path = os.path.join(tmp, "dst")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_vfio_user, path, dst.device)
            async with await open_vfio_user_client(path) as client:
                await client.set_state(MigState.RESUMING)
                await client.write_data([b"abc"])
                with pytest.raises(VfioUserCommandError) as exc:
                    await client.set_state(MigState.RUNNING)
                assert exc.value.errno == errno.EINVAL
            nursery.cancel_scope.cancel()
    assert dst.device.state == MigState.RESUMING
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "transition RESUMING -> STOP: counter state of 3 bytes" in line for line in warnings
    ), warnings
