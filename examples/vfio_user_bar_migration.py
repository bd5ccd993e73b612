"""Migrate an emulated device's state between two vfio-user emulators through vfiomig.

    source BarDevice --vfio-user--> vfiomig send ==multifd==> vfiomig receive --vfio-user--> destination BarDevice

Both emulators are `vfiomig.vfio_user.BarDevice` (state = BAR contents) served with
`serve_vfio_user` in this process; ``vfiomig send`` and ``vfiomig receive`` run as real
processes, as they would on two hosts. At the end the destination's BARs are read back
over vfio-user (REGION_READ) and compared with the source's, byte for byte.

Run: python examples/vfio_user_bar_migration.py [--channels N] [--bar-size BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid

import trio

from vfiomig.vfio_user import BarDevice, MigState, open_vfio_user_client, serve_vfio_user

IDSTR = "0000:00:04.0/vfio"


async def run_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "vfiomig", *args]
    result = await trio.run_process(cmd, check=False, capture_stdout=True, capture_stderr=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed: {result.stderr.decode().strip()}")


async def main(channels: int, bar_size: int) -> None:
    src = BarDevice((bar_size, 4096))
    src.bars[0][:] = os.urandom(bar_size)
    src.bars[1][:] = os.urandom(4096)
    dst = BarDevice((bar_size, 4096))
    session = str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="vfmig", dir="/tmp") as tmp:
        src_sock, dst_sock = f"{tmp}/src.sock", f"{tmp}/dst.sock"
        ready = f"{tmp}/ready.json"
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_vfio_user, src_sock, src)
            await nursery.start(serve_vfio_user, dst_sock, dst)

            async def receive() -> None:
                await run_cli(
                    "receive", "--listen", f"unix:{tmp}/data.sock", "--channels", str(channels),
                    "--uuid", session, "--gate", "open", "--config-out", tmp,
                    "--device", f"{IDSTR}=vfio-user:{dst_sock}", "--ready-file", ready,
                )  # fmt: skip

            async with trio.open_nursery() as migration:
                migration.start_soon(receive)
                with trio.fail_after(30):
                    while not await trio.Path(ready).exists():  # noqa: ASYNC110 - another process
                        await trio.sleep(0.05)  # the receiver writes it once it listens
                data_addr = json.loads(await trio.Path(ready).read_text())["data"][0]
                await run_cli(
                    "send", "--connect", data_addr, "--channels", str(channels),
                    "--uuid", session, "--packet-size", "64KiB",
                    "--device", f"{IDSTR}=vfio-user:{src_sock}",
                )  # fmt: skip

            # The destination is in STOP; bring it up and read its BARs back over vfio-user.
            async with await open_vfio_user_client(dst_sock) as client:
                await client.set_state(MigState.RUNNING)
                bars = [await client.region_read(i, 0, len(b)) for i, b in enumerate(src.bars)]
            nursery.cancel_scope.cancel()
    if bars != [bytes(b) for b in src.bars]:
        raise SystemExit("destination BARs differ from the source's")
    total = sum(len(b) for b in bars)
    print(f"ok: {total} bytes of BAR state migrated over {channels} channels, BARs identical")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--bar-size", type=int, default=1 << 20)
    args = parser.parse_args()
    trio.run(main, args.channels, args.bar_size)
