"""Device sources through `vfiomig send`'s C send path, as real processes: a kernel VFIO
device whose data fd a C thread reads (a ``fed`` fake, see `tests.e2e.fakevfio_send`) and
vfiomig's own vfio-user server (a process) whose replies a C thread receives, into
`vfiomig receive` over TCP; a device read error mid-stream, a channel reset, SIGTERM during the
send, and the device's server going away each end the send with one line and exit 1, the
device put back where it can be."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.receive_args import DEV, UUID_TEXT, out_file, receive_args
from tests.e2e.specsender import Receiver
from vfiomig import _core as core
from vfiomig.bench._vfio_user import _SERVE

pytestmark = pytest.mark.skipif(
    getattr(core, "SendJob", None) is None, reason="the C send path needs the C core"
)


def send_argv(tmp: Path, connect: str, spec: str, model: Mapping[str, object] | None) -> list[str]:
    head = [sys.executable, "-m", "vfiomig"]
    if model is not None:
        head = [sys.executable, "-m", "tests.e2e.fakevfio_send", json.dumps(model), str(tmp / "fake")]  # fmt: skip
    return [
        *head, "send", "--connect", connect, "--channels", "3", "--uuid", UUID_TEXT,
        "--device", f"{DEV}/0={spec}", "--packet-size", "64KiB", "--json",
        "-v", "--log-format", "json",
    ]  # fmt: skip


def events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def send_threads_mode(stderr: str) -> list[str]:
    """The C send path's mode of each device, from the ``send_threads`` events."""
    return [e["fields"]["mode"] for e in events(stderr) if e.get("event") == "send_threads"]


def failure_line(returncode: int | None, stderr: str) -> str:
    """The one ``send_failed`` line of a send that exited 1."""
    assert returncode == 1, stderr
    (line,) = [e["message"] for e in events(stderr) if e.get("event") == "send_failed"]
    assert isinstance(line, str)
    return line


def fake_state(tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((tmp / "fake.json").read_text())
    return result


def test_a_kernel_vfio_device_is_read_by_a_c_thread(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, receive_args(tmp_path, [(DEV, 0)], 3))
    model = {"stop_copy": 5_000_003, "seed": 11, "fed": True}
    result = subprocess.run(
        send_argv(tmp_path, rx.data, "vfio:{device}", model),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    code, _, err = rx.wait()
    assert code == 0, err
    saved = (tmp_path / "fake.saved").read_bytes()
    assert len(saved) == 5_000_003 and out_file(tmp_path, DEV, 0) == saved
    assert send_threads_mode(result.stderr) == ["stream"]
    assert fake_state(tmp_path)["state"] == "STOP"
    assert json.loads(result.stdout.splitlines()[-1])["bytes"] == 5_000_003


def test_a_kernel_vfio_read_error_mid_stream_exits_1_device_running(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, receive_args(tmp_path, [(DEV, 0)], 3))
    model = {"stop_copy": 8_000_000, "fed": True, "read_errno_at": [3_000_000, 5]}
    result = subprocess.run(
        send_argv(tmp_path, rx.data, "vfio:{device}", model),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    line = failure_line(result.returncode, result.stderr)
    assert line.startswith(f"send failed: {DEV}/0: reading source vfio:"), line
    assert "reading the data fd failed in STOP_COPY at byte 3000000" in line, line
    assert "Connection reset by peer" in line and "device back in RUNNING from STOP_COPY" in line
    assert send_threads_mode(result.stderr) == ["stream"]
    code, _, err = rx.wait()
    assert code == 1, err
    state = fake_state(tmp_path)
    assert state["state"] == "RUNNING" and state["resets"] == 0


def test_a_vfio_user_device_is_read_by_a_c_thread(tmp_path: Path) -> None:
    """vfiomig's own vfio-user server (a process): its STOP_COPY stream read by the C
    reader thread (native/vfiomig_sendvu.c), every byte where the receiver wrote it, the
    device stopped after."""
    server, sock = vfio_user_server(tmp_path, "5000003")
    rx = Receiver(tmp_path, receive_args(tmp_path, [(DEV, 0)], 3))
    try:
        result = subprocess.run(
            send_argv(tmp_path, rx.data, f"vfio-user:{sock}", None),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        code, _, err = rx.wait()
        assert code == 0, err
        assert server.wait(30) == 0  # the client hung up after SET STOP
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stderr:
            server.stderr.close()
    assert out_file(tmp_path, DEV, 0) == b"\xa5" * 5_000_003
    assert send_threads_mode(result.stderr) == ["stream"]  # the C reader, not pushed
    assert json.loads(result.stdout.splitlines()[-1])["bytes"] == 5_000_003


def stalled_receiver() -> tuple[socket.socket, str]:
    """A listener nobody accepts from: the sender connects, then blocks once the socket
    buffers are full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, f"tcp:127.0.0.1:{listener.getsockname()[1]}"


def wait_for_threads(proc: subprocess.Popen[str]) -> None:
    """Until the sender's C send path started (its threads' names), bounded."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            names = [
                (Path(f"/proc/{proc.pid}/task") / t / "comm").read_text()
                for t in os.listdir(f"/proc/{proc.pid}/task")
            ]
        except OSError:
            names = []
        if any(n.startswith("vfm-send-") for n in names):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the send threads never started")


def vfio_user_server(tmp: Path, size: str) -> tuple[subprocess.Popen[bytes], str]:
    """vfiomig's own vfio-user server (a process), its device's STOP_COPY stream ``size``
    bytes of 0xa5 (`vfiomig.bench._vfio_user.NullEmulator`), serving one client."""
    sock = str(tmp / "device.sock")
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVE, sock, size, "--once"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        assert server.poll() is None and time.monotonic() < deadline, "no vfio-user server"
        time.sleep(0.02)
    return server, sock


def device_source(
    tmp: Path, kind: str, size: int
) -> tuple[subprocess.Popen[bytes] | None, str, dict[str, object] | None]:
    """A device of ``size`` STOP_COPY bytes to send: the fed fake VFIO device (its model,
    for `send_argv`), or vfiomig's vfio-user server (its process): (server, spec, model)."""
    if kind == "vfio-user":
        server, sock = vfio_user_server(tmp, str(size))
        return server, f"vfio-user:{sock}", None
    return None, "vfio:{device}", {"stop_copy": size, "fed": True, "keep": False}


def drain_until_exit(proc: subprocess.Popen[str], conns: list[socket.socket]) -> None:
    """Read whatever the channels ``conns`` carry until the sender exits (30 s at most),
    so that it reaches its next read or send."""
    for c in conns:
        c.setblocking(False)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        for c in conns:
            try:
                c.recv(1 << 20)
            except OSError:
                pass


def assert_device_running(tmp: Path, server: subprocess.Popen[bytes] | None) -> None:
    """The aborted device is back in RUNNING: the fake's final state, or the vfio-user
    server's clean exit (its client hung up after SET RUNNING)."""
    if server is None:
        assert fake_state(tmp)["state"] == "RUNNING"
    else:
        assert server.wait(30) == 0
        assert server.stderr is not None
        server.stderr.close()


@pytest.mark.parametrize("kind", ["vfio", "vfio-user"])
def test_sigterm_during_a_device_send_aborts_it(tmp_path: Path, kind: str) -> None:
    listener, addr = stalled_receiver()
    server, spec, model = device_source(tmp_path, kind, 1 << 30)
    argv = send_argv(tmp_path, addr, spec, model)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_threads(proc)
        time.sleep(0.3)  # the channels' buffers fill; every thread waits
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = failure_line(proc.returncode, err)
    assert line == "send failed: migration aborted: received SIGTERM", line
    assert json.loads(out.splitlines()[-1])["ok"] is False
    assert send_threads_mode(err) == ["stream"]  # a C reader thread, either device
    assert_device_running(tmp_path, server)


def test_the_vfio_user_device_going_away_mid_send_exits_1(tmp_path: Path) -> None:
    listener, addr = stalled_receiver()
    server, sock = vfio_user_server(tmp_path, "1G")
    argv = send_argv(tmp_path, addr, f"vfio-user:{sock}", None)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_threads(proc)
        server.kill()  # the device's server dies while the sender waits for room
        server.wait()
        # The sender sees it at its next read: let the channels drain so that it reads.
        conns = [listener.accept()[0] for _ in range(3)]
        drain_until_exit(proc, conns)
        _out, err = proc.communicate(timeout=30)
        for c in conns:
            c.close()
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server.stderr:
            server.stderr.close()
    line = failure_line(proc.returncode, err)
    assert line.startswith(f"send failed: {DEV}/0: reading source vfio-user:{sock} failed: "), line
    assert "\n" not in line


@pytest.mark.parametrize("kind", ["vfio", "vfio-user"])
def test_a_channel_reset_during_a_device_send_exits_1(tmp_path: Path, kind: str) -> None:
    """A receiver that resets channel 1 after a few hundred KiB: one line naming the
    channel, exit 1, the device back in RUNNING."""
    listener, addr = stalled_receiver()
    server, spec, model = device_source(tmp_path, kind, 256 << 20)
    proc = subprocess.Popen(
        send_argv(tmp_path, addr, spec, model),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    conns: list[socket.socket] = []
    try:
        conns = [listener.accept()[0] for _ in range(3)]
        got = 0
        while got < 300_000:  # the handshake and some packets of channel 1
            chunk = conns[1].recv(1 << 16)
            assert chunk
            got += len(chunk)
        conns[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conns[1].close()  # a reset
        drain_until_exit(proc, [conns[0], conns[2]])
        _out, err = proc.communicate(timeout=30)
    finally:
        for c in conns:
            c.close()
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = failure_line(proc.returncode, err)
    assert line.startswith("send failed: channel 1: ") and "\n" not in line, line
    assert_device_running(tmp_path, server)
