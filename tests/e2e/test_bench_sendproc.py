"""The bench's sender process (``python -m vfiomig.bench._sendproc``): what it reports."""

from __future__ import annotations

import json
import sys

import trio

from vfiomig._core._wire import HANDSHAKE_SIZE


async def test_sendproc_reports_bytes_and_its_cpu_time() -> None:
    received = [0]
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    job = {
        "mode": "send",
        "connect": [f"tcp:127.0.0.1:{port}"],
        "channels": 2,
        "uuid": "00" * 16,
        "devices": [{"idstr": "0000:00:04.0/vfio", "instance": 0, "size": 3 << 20, "seed": 1}],
        "packet_size": 4096,
        "order": "roundrobin",
        "seed": 0,
    }

    async def drain(stream: trio.SocketStream) -> None:
        async with stream:
            while chunk := await stream.receive_some(1 << 20):
                received[0] += len(chunk)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                for _ in range(2):
                    nursery.start_soon(drain, await listener.accept())

            nursery.start_soon(accept)
            proc = await trio.run_process(
                [sys.executable, "-m", "vfiomig.bench._sendproc", json.dumps(job)],
                capture_stdout=True,
            )
        await listener.aclose()
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result["ok"] and result["bytes"] == 3 << 20
    assert result["packets"] == 3 * 256 + 1
    assert received[0] == 2 * HANDSHAKE_SIZE + result["wire_bytes"]
    assert result["cpu_seconds"] > 0
    wall = result["t_end"] - result["t_start"]
    assert result["busy"] == result["cpu_seconds"] / wall
