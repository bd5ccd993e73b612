"""Strangers on the listeners of a real `vfiomig receive` whose fd limit is low (soft
RLIMIT_NOFILE 256): floods of idle, trickling (a byte a second), wrong-uuid and garbage
connections on the data and control listeners, more than the limit, must not stop the
real migration. See RELIABILITY.md §6 for the figures."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import pytest
import trio

from tests.e2e.specsender import handshake
from vfiomig.testing import synth_bytes

UUID_TEXT = "5c6e8d2a-9b3f-4c1d-8e7a-6b5c4d3e2f10"
UUID = bytes.fromhex(UUID_TEXT.replace("-", ""))
DEV = "0000:00:04.0/vfio"
FD_LIMIT = 256
HANDSHAKE_TIMEOUT = 5.0
STATE_SIZE = 16 * 1024 * 1024
#: Stranger connections held at once per listener (together beyond `FD_LIMIT`).
DATA_STRANGERS = 320
CONTROL_STRANGERS = 80
#: A stranger whose connection was closed waits this long before it connects again.
RECONNECT_DELAY = 0.5


def _limit_fds() -> None:  # runs in the receiver's process before exec
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


class Receiver:
    """`vfiomig receive --gate control` with a low fd limit and a TCP control channel;
    its output goes to files (a pipe nobody reads would stall its log)."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        tmp.mkdir()
        self.tmp = tmp
        self.ready = tmp / "ready.json"
        self.out = tmp / "state.out"
        cmd = [
            sys.executable,
            "-m",
            "vfiomig",
            "receive",
            "--listen",
            "tcp:127.0.0.1:0",
            "--control",
            "tcp:127.0.0.1:0",
            "--gate",
            "control",
            "--channels",
            "4",
            "--uuid",
            UUID_TEXT,
            "--device",
            f"{DEV}=file:{self.out}",
            "--config-out",
            str(tmp),
            "--handshake-timeout",
            str(HANDSHAKE_TIMEOUT),
            "--stall-timeout",
            "120",
            "--ready-file",
            str(self.ready),
            "--json",
            *extra,
        ]
        with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=_limit_fds)
        deadline = time.monotonic() + 20
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"receiver did not start: {self.stderr()}")
            time.sleep(0.02)
        info = json.loads(self.ready.read_text())
        self.data: str = info["data"][0]
        self.control: str = info["control"]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stderr(self) -> str:
        return (self.tmp / "stderr").read_text()

    def wait(self, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            sent = self.tmp / "send.stderr"
            sender = sent.read_text() if sent.exists() else ""
            raise AssertionError(
                f"receiver still running: {self.stderr()[-3000:]}\nsender:\n{sender[-3000:]}"
            ) from None
        assert "Traceback" not in self.stderr(), self.stderr()
        out = (self.tmp / "stdout").read_text()
        return self.proc.returncode, json.loads(out) if out else {}


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start receivers under ``tmp_path``; any still running at the end is killed (a
    receiver that never got a packet would wait for its gate forever)."""
    started: list[Receiver] = []

    def start(name: str, *extra: str) -> Receiver:
        started.append(Receiver(tmp_path / name, *extra))
        return started[-1]

    yield start
    for rx in started:
        if rx.proc.poll() is None:
            rx.proc.kill()
            rx.proc.wait()


# Coroutine, not Awaitable: what start_soon takes (a task runs a coroutine).
Behaviour: TypeAlias = Callable[[trio.SocketStream], Coroutine[Any, Any, None]]


async def _until_closed(stream: trio.SocketStream, every: float, byte: bytes) -> None:
    """Send ``byte`` every ``every`` seconds (nothing if empty) until the peer closes (a
    refused connection is reset)."""
    try:
        while True:
            if byte:
                await stream.send_all(byte)
            with trio.move_on_after(every):
                if not await stream.receive_some(4096):
                    return
    except trio.BrokenResourceError:
        return


async def idle(stream: trio.SocketStream) -> None:
    await _until_closed(stream, 3600, b"")


async def trickle(stream: trio.SocketStream) -> None:
    await _until_closed(stream, 1.0, b"\x11")


async def wrong_uuid(stream: trio.SocketStream) -> None:
    await stream.send_all(handshake(bytes(16), 0))
    await _until_closed(stream, 3600, b"")


async def garbage(stream: trio.SocketStream) -> None:
    await stream.send_all(random.randbytes(300))
    await _until_closed(stream, 3600, b"")


DATA_KINDS: list[Behaviour] = [idle, trickle, wrong_uuid, garbage]
CONTROL_KINDS: list[Behaviour] = [idle, trickle, garbage]


class Flood:
    """Stranger tasks; each holds one connection and connects again (after
    `RECONNECT_DELAY`) once the receiver closed it. Ends when its nursery is cancelled."""

    def __init__(self) -> None:
        self.opened = 0

    async def run(self, targets: list[tuple[str, int, list[Behaviour]]]) -> None:
        async with trio.open_nursery() as nursery:
            for address, count, kinds in targets:
                for i in range(count):
                    nursery.start_soon(self._stranger, address, kinds[i % len(kinds)])
                    if i % 16 == 15:
                        await trio.sleep(0.01)  # not the whole backlog at once

    async def _stranger(self, address: str, behave: Behaviour) -> None:
        host, port = address.removeprefix("tcp:").rsplit(":", 1)
        while True:
            try:
                with trio.fail_after(5):
                    stream = await trio.open_tcp_stream(host, int(port))
            except (OSError, trio.TooSlowError):
                await trio.sleep(RECONNECT_DELAY)
                continue
            self.opened += 1
            async with stream:
                try:
                    await behave(stream)
                except (trio.BrokenResourceError, OSError):
                    pass  # evicted or refused
            await trio.sleep(RECONNECT_DELAY)


async def migrate(rx: Receiver) -> tuple[float, dict[str, Any]]:
    """`vfiomig send` through ``rx``'s data and control listeners; the seconds from its
    start to the receiver's exit, and the receiver's JSON summary."""
    start = trio.current_time()
    send = await trio.run_process(
        [
            sys.executable,
            "-m",
            "vfiomig",
            "send",
            "--connect",
            rx.data,
            "--control",
            rx.control,
            "--channels",
            "4",
            "--uuid",
            UUID_TEXT,
            "--device",
            f"{DEV}=synth:{STATE_SIZE}:5",
            "--packet-size",
            "256KiB",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    # The sender's own account, kept beside the receiver's (both are printed on failure).
    (rx.tmp / "send.stderr").write_bytes(send.stderr)
    code, summary = await trio.to_thread.run_sync(rx.wait)
    seconds = trio.current_time() - start
    accounts = f"sender:\n{send.stderr.decode()[-3000:]}\nreceiver:\n{rx.stderr()[-3000:]}"
    assert send.returncode == 0, accounts
    assert code == 0, accounts
    # Nothing a stranger sent reached the sink: it holds exactly the stream.
    assert rx.out.read_bytes() == synth_bytes(STATE_SIZE, 5)
    assert summary["ok"] is True and summary["channels_accepted"] == 4
    return seconds, summary


async def _fds_settle(rx: Receiver, count: int, within: float) -> float:
    """Wait until ``rx`` holds ``count`` fds; the seconds it took."""
    start = trio.current_time()
    with trio.move_on_after(within):
        while rx.fds() != count:  # noqa: ASYNC110 - polling another process
            await trio.sleep(0.05)
    fds = {}
    for fd in os.listdir(f"/proc/{rx.proc.pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{rx.proc.pid}/fd/{fd}")
        except OSError:
            pass
    assert len(fds) == count, (count, fds)
    return trio.current_time() - start


async def test_floods_past_the_fd_limit_do_not_stop_the_migration(
    spawn: Callable[..., Receiver],
) -> None:
    base, base_summary = await migrate(spawn("baseline"))
    rx = spawn("flooded")
    targets = [
        (rx.data, DATA_STRANGERS, DATA_KINDS),
        (rx.control, CONTROL_STRANGERS, CONTROL_KINDS),
    ]
    before = rx.fds()
    peak = before
    # 1. Strangers past the fd limit: the receiver holds its cap, not their number.
    flood = Flood()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood.run, targets)
        with trio.fail_after(60):
            while flood.opened < 2 * FD_LIMIT:
                peak = max(peak, rx.fds())
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert rx.proc.poll() is None, rx.stderr()
    # 2. They leave: every fd they took is closed again.
    settled = await _fds_settle(rx, before, HANDSHAKE_TIMEOUT + 5)
    rx_after = rx.fds()
    # 3. Strangers arriving all along while the real migration goes through.
    flood = Flood()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood.run, targets)
        with trio.fail_after(60):
            while flood.opened < FD_LIMIT:  # noqa: ASYNC110 - polling another process
                await trio.sleep(0.02)
        seconds, summary = await migrate(rx)
        nursery.cancel_scope.cancel()
    log = rx.stderr()
    load, base_load = summary["devices"][0]["seconds"], base_summary["devices"][0]["seconds"]
    print(
        f"strangers {flood.opened}, fd limit {FD_LIMIT}, baseline {base:.2f} s "
        f"(session {base_summary['seconds']:.2f} s), flooded {seconds:.2f} s (session "
        f"{summary['seconds']:.2f} s, load {load:.2f} s), fds before {before} peak {peak} after {rx_after} "
        f"(settled in {settled:.2f} s), summary {summary}, log lines {len(log.splitlines())}"
    )
    assert peak < FD_LIMIT - 100  # the pending caps (32 data + 8 control) bound it
    # The load (the device's first packet to loaded) within the handshake timeout plus
    # its own time unflooded; the wall time (processes starting beside the flood's CPU,
    # the session's teardown) more loosely.
    assert load < HANDSHAKE_TIMEOUT + base_load, summary
    assert seconds < HANDSHAKE_TIMEOUT + base + 10, (seconds, base)
    assert summary["channels_evicted"] > 0 and summary["channels_refused"] > 0
    assert summary["control_evicted"] > 0
    assert len(log.splitlines()) < 100, log  # throttled: not a line per stranger


async def test_fd_exhaustion_on_accept_is_waited_out(spawn: Callable[..., Receiver]) -> None:
    """A pending cap above the fd limit: accept fails with EMFILE; the receiver evicts,
    retries, logs the burst once, and the migration goes through."""
    rx = spawn("emfile", "--max-pending", "2000")
    flood = Flood()
    async with trio.open_nursery() as nursery:
        targets: list[tuple[str, int, list[Behaviour]]] = [
            (rx.data, DATA_STRANGERS, [idle, trickle])
        ]
        nursery.start_soon(flood.run, targets)
        with trio.fail_after(60):
            while "Too many open files" not in rx.stderr():  # noqa: ASYNC110 - polling another process
                await trio.sleep(0.05)
        seconds, summary = await migrate(rx)
        nursery.cancel_scope.cancel()
    log = rx.stderr()
    bursts = log.count("accept failed: Too many open files")
    lowered = re.findall(r"vfiomig: pending limit lowered to (\d+): out of fds", log)
    print(
        f"EMFILE: {flood.opened} strangers, {seconds:.2f} s, {bursts} bursts, pending limit "
        f"lowered to {lowered}, log lines {len(log.splitlines())}, {summary}"
    )
    # Once per burst and listener (data, control), not per failed accept: the lowered cap
    # keeps the fds it freed free, so the shortage does not come back.
    assert 1 <= bursts <= 4, log
    assert lowered and int(lowered[-1]) < FD_LIMIT
    assert summary["channels_evicted"] > 0
    assert len(log.splitlines()) < 100, log
