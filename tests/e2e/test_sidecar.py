"""``vfiomig receive --control unix:...`` as a real process, driven by a peer that speaks
only SPEC.md §3 (raw msgpack on a UNIX socket; none of vfiomig's client code)."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from pathlib import Path
from typing import Any

import msgpack
import trio

from vfiomig.testing import channel_streams, device_packets, synth_config

UUID = "00112233-4455-6677-8899-aabbccddeeff"
IDSTR = "0000:00:04.0/vfio"


async def _wait_for_file(path: Path, proc: trio.Process) -> dict[str, Any]:
    while not await trio.Path(path).exists():
        assert proc.returncode is None, "receiver exited before it was ready"
        await trio.sleep(0.02)
    result: dict[str, Any] = json.loads(await trio.Path(path).read_text())
    return result


async def test_receive_process_driven_by_a_spec_only_peer(tmp_path: Path) -> None:
    state = random.Random(2).randbytes(300_000)
    config = synth_config(9)
    precopy = b"main-channel state " * 100
    out = tmp_path / "out.bin"
    ready = tmp_path / "ready.json"
    sockdir = tmp_path / "run"
    sockdir.mkdir(mode=0o700)
    cmd = [
        sys.executable, "-m", "vfiomig", "receive",
        "--listen", "tcp:127.0.0.1:0", "--channels", "3", "--uuid", UUID,
        "--device", f"{IDSTR}/0=file:{out}", "--control", f"unix:{sockdir}/ctl",
        "--ready-file", str(ready), "--json", "--stall-timeout", "10",
    ]  # fmt: skip
    packets = device_packets(IDSTR, 0, state, config, 10_000)
    streams = channel_streams(packets, 3, bytes.fromhex(UUID.replace("-", "")), seed=4)
    with (
        trio.fail_after(30),
        open(tmp_path / "stdout", "wb") as stdout,  # noqa: ASYNC230 - before any I/O
        open(tmp_path / "stderr", "wb") as stderr,  # noqa: ASYNC230
    ):
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                lambda task_status: trio.run_process(  # noqa: ASYNC105 - nursery.start awaits it
                    cmd, stdout=stdout, stderr=stderr, check=False,
                    task_status=task_status,
                )
            )  # fmt: skip
            info = await _wait_for_file(ready, proc)
            assert info["control"] == f"unix:{sockdir}/ctl"
            assert os.stat(f"{sockdir}/ctl").st_mode & 0o777 == 0o600
            ctl = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await ctl.connect(f"{sockdir}/ctl")
            events: list[dict[str, Any]] = []
            unpacker = msgpack.Unpacker(raw=False)

            async def next_event() -> dict[str, Any]:
                while True:
                    for obj in unpacker:
                        events.append(obj)
                        return obj  # type: ignore[no-any-return]
                    data = await ctl.recv(65536)
                    assert data, f"control channel closed; events so far: {events}"
                    unpacker.feed(data)

            async def send(msg: dict[str, Any]) -> None:
                await ctl.send(msgpack.packb(msg, use_bin_type=True))

            await send({"type": "hello", "version": 1})
            hello = await next_event()
            assert hello == {
                "type": "hello",
                "version": 1,
                "channels": 3,
                "devices": [{"device": IDSTR, "instance": 0}],
            }
            await send({"type": "precopy", "device": IDSTR, "instance": 0, "data": precopy})
            await send({"type": "no-such-message"})
            assert (await next_event())["type"] == "error"
            for i, data in enumerate(streams):
                # The last channel comes after data-complete: multifd data before and
                # after the gate opens must both land after the precopy bytes.
                if i == 2:
                    await send({"type": "data-complete", "device": IDSTR, "instance": 0})
                addr = info["data"][0].removeprefix("tcp:")
                host, port = addr.rsplit(":", 1)
                chan = await trio.open_tcp_stream(host, int(port))
                await chan.send_all(data)
                await chan.aclose()
            seen: dict[str, dict[str, Any]] = {}
            while "done" not in seen:
                event = await next_event()
                seen[event["type"]] = event
            ctl.close()
    assert seen["config"] == {"type": "config", "device": IDSTR, "instance": 0, "data": config}
    assert seen["loaded"]["bytes"] == len(precopy) + len(state)
    assert seen["done"] == {"type": "done", "ok": True}
    order = [e["type"] for e in events if e["type"] != "progress"]
    assert order.index("config") < order.index("loaded") < order.index("done")
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    assert out.read_bytes() == precopy + state
    summary = json.loads((tmp_path / "stdout").read_text())
    (device,) = summary["devices"]
    assert device["loaded"] and device["bytes"] == len(precopy) + len(state)
    assert {"packets", "seconds", "peak_queued_bytes", "starved_seconds"} <= device.keys()
