"""A standalone migration (no VMM attached) of the guide's device through real ``vfiomig
send`` / ``vfiomig receive`` processes carries PCI config space: the destination ends with
the source's command register, BARs and MSI state (SPEC.md §4)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import trio

from vfiomig.testing.vfio_user import open_harness

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "vfio-user-emulators.md"
IDSTR = "0000:00:05.0/vfio"


def guide_device() -> Any:
    """A fresh ``MigratableCounter`` from the guide's code blocks."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    namespace: dict[str, Any] = {"__name__": "guide"}
    for block in blocks:
        if "class " in block and "def test_" not in block:
            exec(compile(block, str(GUIDE), "exec"), namespace)
    return namespace["MigratableCounter"]()


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "vfiomig", *args]
    return await trio.run_process(cmd, check=False, capture_stdout=True, capture_stderr=True)


async def migrate(tmp: str, src_path: str, dst_path: str, source_extra: str = "") -> str:
    """``vfiomig receive`` and ``vfiomig send`` processes, one device; the receiver's log."""
    session = str(uuid.uuid4())
    ready = Path(tmp) / "ready.json"
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def receive() -> None:
        results["receive"] = await cli(
            "receive", "--listen", f"unix:{tmp}/data.sock", "--channels", "2",
            "--uuid", session, "--gate", "open", "--config-out", tmp, "-v",
            "--device", f"{IDSTR}=vfio-user:{dst_path},max-write=1M",
            "--ready-file", str(ready),
        )  # fmt: skip

    async with trio.open_nursery() as migration:
        migration.start_soon(receive)
        while not ready.exists():  # noqa: ASYNC110 - written by another process
            await trio.sleep(0.05)
        data = json.loads(ready.read_text())["data"][0]
        results["send"] = await cli(
            "send", "--connect", data, "--channels", "2", "--uuid", session,
            "--device", f"{IDSTR}=vfio-user:{src_path}{source_extra}",
        )  # fmt: skip
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr.decode())
    err: bytes = results["receive"].stderr
    return err.decode()


async def test_send_receive_processes_carry_command_bars_and_msi() -> None:
    src, dst = guide_device(), guide_device()
    with tempfile.TemporaryDirectory(prefix="vfcs", dir="/tmp") as tmp, trio.fail_after(90):
        async with open_harness() as vfio_user:
            client = await vfio_user.attach(src.device)
            msi = src.device.pci.cap_offsets[0x05]
            # What a VMM programs before the guest runs: BAR0, MSI address, data and
            # enable, then memory decoding and bus mastering in the command register.
            await client.region_write(7, 0x10, struct.pack("<I", 0xFEBF0000))
            await client.region_write(7, msi + 4, struct.pack("<II", 0xFEE01000, 0))
            await client.region_write(7, msi + 12, struct.pack("<H", 0x4021))
            await client.region_write(7, msi + 2, struct.pack("<H", 0x0001))
            await client.region_write(7, 0x04, struct.pack("<H", 0x0406))
            await client.region_write(0, 0, struct.pack("<I", 42))
            source_config = await client.region_read(7, 0, 256)
            await vfio_user.detach(client)
            src_path = await vfio_user.serve(src.device)
            log = await migrate(tmp, src_path, await vfio_user.serve(dst.device))
            client = await vfio_user.attach(dst.device)
            dest_config = await client.region_read(7, 0, 256)
            assert await client.region_read(0, 0, 4) == struct.pack("<I", 42)
            blob = (Path(tmp) / "0000:00:05.0_vfio.0.config").read_bytes()
    assert dest_config == source_config
    pci = dst.device.pci
    assert (pci.command, pci.bar(0)) == (0x0406, 0xFEBF0000)
    assert struct.unpack_from("<HII", pci.space, msi + 2) == (0x0081, 0xFEE01000, 0)
    assert struct.unpack_from("<H", pci.space, msi + 12) == (0x4021,)
    assert "pci config space" in log, log  # what reached the device, in the log
    # The config target got the blob too, markers and all, config space inside.
    assert blob[:8] == bytes.fromhex("ffffffffef100002") and source_config in blob


async def test_a_blob_without_config_space_reaches_no_device_and_the_log_says_so() -> None:
    src, dst = guide_device(), guide_device()
    with tempfile.TemporaryDirectory(prefix="vfcs", dir="/tmp") as tmp, trio.fail_after(90):
        empty = Path(tmp) / "empty.config"
        empty.write_bytes(bytes.fromhex("ffffffffef100002ffffffffef100001"))
        async with open_harness() as vfio_user:
            client = await vfio_user.attach(src.device)
            await client.region_write(7, 0x04, struct.pack("<H", 0x0406))
            await vfio_user.detach(client)
            src_path = await vfio_user.serve(src.device)
            dst_path = await vfio_user.serve(dst.device)
            log = await migrate(tmp, src_path, dst_path, f",config={empty}")
    assert dst.device.pci.command == 0  # config=FILE replaced the config space: none sent
    lines = [line for line in log.splitlines() if "config load end" in line]
    assert len(lines) == 1 and "nothing into the device" in lines[0], log
