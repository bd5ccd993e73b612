"""vfiomig's ``vfio-user:`` sink and source against libvfio-user's ``samples/server``.

The sample device's stream is BAR1 (0x3000 bytes) then BAR0 (a ``time_t``): 12,296 bytes.
Its ``write_data`` takes up to the bytes still missing (more is a partial write, EINVAL),
its transition to RUNNING asserts that the whole stream arrived (the process aborts if
not), and it exits when its client disconnects. With ``-v`` it logs every migration
transition (``transition to device state N``: 0 STOP, 1 RUNNING, 2 STOP_AND_COPY,
4 RESUME) and each reset.
"""

from __future__ import annotations

import errno
import json
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.specsender import Receiver
from tests.integration.send_helpers import run_send
from tests.libvfio_user import LibVfioUser
from vfiomig import _core as core
from vfiomig.vfio_user import (
    MigState,
    VfioUserCommandError,
    VfioUserSink,
    VfioUserSource,
    open_vfio_user_client,
)
from vfiomig.vfio_user.client._sink import start_migration

STREAM = 0x3000 + 8
UUID = "5c6e8d2a-9b3f-4c1d-8e7a-6b5c4d3e2f10"
DEV = "0000:00:04.0/vfio"
BAR0, BAR1 = 0, 1
#: BAR0 of the sample is a time_t at which its timer fires (armed again on RUNNING).
WAKE_AT = struct.pack("=q", int(time.time()) + 3600)


class SampleServer:
    """One ``samples/server -v SOCK`` process; `wait` returns its exit code and log."""

    def __init__(self, lvu: LibVfioUser, path: Path) -> None:
        self.path = str(path)
        self.proc = lvu.sample_server(path)

    def wait(self, timeout: float = 20) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def states(self, log: str) -> list[int]:
        marker = "transition to device state "
        return [int(line.split(marker)[1]) for line in log.splitlines() if marker in line]


@contextmanager
def sample_servers(lvu: LibVfioUser, tmp: Path, n: int) -> Iterator[list[SampleServer]]:
    servers = [SampleServer(lvu, tmp / f"lvu{i}.sock") for i in range(n)]
    try:
        yield servers
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


class SeededSource(VfioUserSource):
    """A source that first writes a known pattern into the device's BARs (in RUNNING, on
    the same connection: the sample server serves one client and exits after it)."""

    async def start(self) -> None:
        client = self._client = await open_vfio_user_client(self.path)
        await client.region_write(BAR1, 0, pattern(0x3000, 1))
        await client.region_write(BAR0, 0, WAKE_AT)
        await start_migration(client, MigState.STOP_COPY)


def test_source_to_sink_between_two_sample_servers(
    libvfio_user: LibVfioUser, tmp_path: Path
) -> None:
    async def migrate(src: str, dst: str) -> tuple[bytes, bytes]:
        source, sink = SeededSource(src), VfioUserSink(dst)
        await source.start()
        stream = bytearray()
        while data := await source.read(4096):  # packets smaller than the stream
            stream += data
        await source.finish()
        await source.aclose()
        await sink.start()
        sink.note_batch(0, 4)
        await sink.write([memoryview(stream)[i : i + 4096] for i in range(0, len(stream), 4096)])
        await sink.finish()
        # In STOP the device answers region reads: it holds what was written.
        bar1 = await sink.client.region_read(BAR1, 0, 0x3000)
        # RUNNING: the sample asserts that the whole stream arrived (aborts if not).
        await sink.client.set_state(MigState.RUNNING)
        await sink.aclose()
        return bytes(stream), bar1

    with sample_servers(libvfio_user, tmp_path, 2) as (a, b):
        stream, bar1 = trio.run(migrate, a.path, b.path)
        (code_a, log_a), (code_b, log_b) = a.wait(), b.wait()
    assert stream == pattern(0x3000, 1) + WAKE_AT
    assert bar1 == pattern(0x3000, 1)
    assert code_a == 0 and code_b == 0, log_a + log_b
    assert a.states(log_a) == [0, 2, 0]  # STOP, STOP_AND_COPY, STOP
    assert b.states(log_b) == [0, 4, 0, 1]  # STOP, RESUME, STOP, RUNNING


def test_the_c_reader_sends_a_sample_servers_stream_as_the_trio_sender(
    libvfio_user: LibVfioUser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seeded sample device's stream, read by the C reader thread (replies of libvfio-user
    itself), is on every channel byte for byte what the trio sender writes; then SET STOP.
    The pure core has no C send path: both sends are the trio sender's, read in Python."""
    import vfiomig.send._threads as threads_module

    real = threads_module.send_threaded
    modes: list[str] = []

    async def spy(devices: Any, chosen: list[str], *args: Any, **kwargs: Any) -> None:
        modes.extend(chosen)
        await real(devices, chosen, *args, **kwargs)

    native: list[bool] = []

    async def send(path: str) -> list[str]:
        hashes: dict[int, Any] = {}
        source = SeededSource(path)
        await run_send(source, 3, hashes=hashes, packet_size=1000)
        native.append(source.read_natively)
        return [hashes[i].hexdigest() for i in range(3)]

    monkeypatch.setattr("vfiomig.send._sender.send_threaded", spy)
    with sample_servers(libvfio_user, tmp_path, 2) as (a, b):
        monkeypatch.setenv("VFIOMIG_SEND_THREADS", "1")
        threaded = trio.run(send, a.path)
        monkeypatch.setenv("VFIOMIG_SEND_THREADS", "0")
        trio_sent = trio.run(send, b.path)
        (code_a, log_a), (code_b, log_b) = a.wait(), b.wait()
    if getattr(core, "SendJob", None) is not None:
        assert modes == ["stream"] and native == [True, False]  # the C reader, then trio
    else:
        assert modes == [] and native == [False, False]
    assert threaded == trio_sent
    assert code_a == 0 and code_b == 0, log_a + log_b
    assert a.states(log_a) == b.states(log_b) == [0, 2, 0]  # STOP, STOP_AND_COPY, STOP


def _send(source: str, connect: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "vfiomig", "send", "--connect", connect, "--channels", "2",
            "--uuid", UUID, "--device", f"{DEV}/0={source}", "--packet-size", "4KiB", *extra,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _receive(tmp: Path, sink: str) -> Receiver:
    return Receiver(
        tmp,
        ["--channels", "2", "--uuid", UUID, "--config-out", str(tmp), "--gate", "open",
         "--json", "--device", f"{DEV}/0={sink}"],
    )  # fmt: skip


def test_cli_send_from_one_sample_server_receive_into_another(
    libvfio_user: LibVfioUser, tmp_path: Path
) -> None:
    with sample_servers(libvfio_user, tmp_path, 2) as (a, b):
        rx = _receive(tmp_path, f"vfio-user:{b.path}")
        send = _send(f"vfio-user:{a.path}", rx.data, "-v")
        code, out, err = rx.wait()
        (code_a, log_a), (code_b, log_b) = a.wait(), b.wait()
    assert send.returncode == 0, send.stderr
    if getattr(core, "SendJob", None) is not None:  # the pure core keeps the trio sender
        # read by the C send path's reader thread (native/vfiomig_sendvu.c), not in Python
        assert "sent from C threads (its reader thread reads the source)" in send.stderr
    assert code == 0, err
    row = json.loads(out)["devices"][0]
    assert row["loaded"] and row["bytes"] == STREAM
    assert code_a == 0 and code_b == 0, log_a + log_b
    assert a.states(log_a) == [0, 2, 0]
    assert b.states(log_b) == [0, 4, 0]  # loaded and stopped; never RUNNING from us
    assert (tmp_path / "0000:00:04.0_vfio.0.config").is_file()


def test_cli_overlong_stream_fails_with_the_refused_writes_errno_and_resets(
    libvfio_user: LibVfioUser, tmp_path: Path
) -> None:
    # 64 KiB into a device that holds 12,296 bytes: the write crossing its end takes
    # fewer bytes than offered, which libvfio-user refuses with EINVAL. Writes already in
    # flight behind it are refused too; abort resets the device (in RESUMING), so it
    # never reaches STOP, let alone RUNNING, with that stream.
    with sample_servers(libvfio_user, tmp_path, 1) as (b,):
        rx = _receive(tmp_path, f"vfio-user:{b.path}")
        _send("synth:64KiB:3", rx.data)
        code, _, err = rx.wait()
        code_b, log_b = b.wait()
    assert code == 1
    lines = [line for line in err.splitlines() if f"{DEV}/0: " in line]
    assert len(lines) == 1, err
    found = re.search(
        rf"vfio-user {re.escape(b.path)}: MIG_DATA_WRITE \((\d+) bytes at stream offset "
        r"(\d+), data of idx (\d+)\.\.(\d+)\) failed with errno 22 \(Invalid argument\)",
        lines[0],
    )
    assert found, lines[0]
    size, offset, first, last = map(int, found.groups())
    assert offset <= STREAM < offset + size  # the write that runs past the device's end
    assert offset == first * 4096 and offset + size == (last + 1) * 4096
    assert "migration data partial write" in log_b
    assert "device reset callback" in log_b
    assert b.states(log_b) == [0, 4]  # STOP, RESUME: never STOP again, never RUNNING
    assert code_b == 0, log_b


def test_write_in_the_wrong_state_reports_the_errno(
    libvfio_user: LibVfioUser, tmp_path: Path
) -> None:
    async def run(path: str) -> VfioUserCommandError:
        client = await open_vfio_user_client(path)
        try:
            with pytest.raises(VfioUserCommandError) as info:
                await client.write_data([b"x" * 100], tag=(7, 8))  # still RUNNING
                await client.flush()
            # The connection stays in step: the device still answers.
            assert await client.get_state() == MigState.RUNNING
            return info.value
        finally:
            await client.aclose()

    with sample_servers(libvfio_user, tmp_path, 1) as (b,):
        failure = trio.run(run, b.path)
        code_b, log_b = b.wait()
    assert (failure.errno, failure.idx) == (errno.EINVAL, 7)
    assert "MIG_DATA_WRITE (100 bytes at stream offset 0, data of idx 7..7)" in str(failure)
    assert "failed with errno 22 (Invalid argument)" in str(failure)
    assert "bad migration state to write data" in log_b
    assert code_b == 0
