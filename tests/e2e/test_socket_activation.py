"""`vfiomig receive` on listening sockets it inherited, as systemd and libvirt hand them over:
``--listen fd:N``/``--control fd:N``, and systemd's LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID.

The test binds the sockets itself (the supervisor's part), starts the receiver as a real
process with them, reads the real addresses from its ready file and migrates through them
with ``vfiomig send`` (data channels and control channel both).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vfiomig.testing import synth_config, synth_sha256

UUID = "5c6e8d2a-9b3f-4c1d-8e7a-6b5c4d3e2f10"
DEV = "0000:00:04.0/vfio"
SIZE = 6 * 2**20
SEED = 5

#: What a supervisor does between fork and exec: the sockets at fds 3, 4, ... and
#: LISTEN_PID set to the pid that will run vfiomig (exec keeps it).
LAUNCH = """
import fcntl, os, sys
fds = [int(f) for f in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2], LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "vfiomig", *sys.argv[3:]])
"""


def _tcp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def _unix_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)
    return s


def _receive_args(tmp: Path) -> list[str]:
    return [
        "receive",
        "--channels",
        "4",
        "--uuid",
        UUID,
        "--device",
        f"{DEV}=file:{tmp / 'state.out'}",
        "--config-out",
        str(tmp),
        "--ready-file",
        str(tmp / "ready.json"),
        "--json",
    ]


def _wait_ready(proc: subprocess.Popen[str], ready: Path) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _out, err = proc.communicate(timeout=5)
            raise AssertionError(f"receiver did not start: {err}")
        time.sleep(0.02)
    addresses: dict[str, object] = json.loads(ready.read_text())
    return addresses


def _migrate(proc: subprocess.Popen[str], connect: list[str], control: str, tmp: Path) -> None:
    cmd = [sys.executable, "-m", "vfiomig", "send", "--channels", "4", "--uuid", UUID]
    for addr in connect:
        cmd += ["--connect", addr]
    cmd += ["--control", control, "--device", f"{DEV}=synth:{SIZE}:{SEED}", "--order", "random"]
    send = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out, err = proc.communicate(timeout=60)
    assert send.returncode == 0, send.stderr
    assert proc.returncode == 0, err
    assert json.loads(out)["ok"] is True
    landed = hashlib.sha256((tmp / "state.out").read_bytes()).hexdigest()
    assert landed == synth_sha256(SIZE, SEED)
    assert (tmp / f"{DEV.replace('/', '_')}.0.config").read_bytes() == synth_config(SEED)


def test_listen_and_control_on_inherited_fds(tmp_path: Path) -> None:
    data = _tcp_listener()
    control = _unix_listener(tmp_path / "ctl.sock")
    with data, control:
        port = data.getsockname()[1]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vfiomig",
                *_receive_args(tmp_path),
                "--listen",
                f"fd:{data.fileno()}",
                "--control",
                f"fd:{control.fileno()}",
            ],
            pass_fds=(data.fileno(), control.fileno()),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    ready = _wait_ready(proc, tmp_path / "ready.json")
    # The ready file names where the sockets really listen, not the fd numbers.
    assert ready == {"data": [f"tcp:127.0.0.1:{port}"], "control": f"unix:{tmp_path}/ctl.sock"}
    _migrate(proc, [f"tcp:127.0.0.1:{port}"], f"unix:{tmp_path}/ctl.sock", tmp_path)


def test_systemd_listen_fds_with_names(tmp_path: Path) -> None:
    """Two data sockets (TCP and UNIX) and a TCP control socket, named as a socket unit's
    FileDescriptorName= would name them."""
    tcp = _tcp_listener()
    unix = _unix_listener(tmp_path / "data.sock")
    control = _tcp_listener()
    socks = [tcp, unix, control]
    with tcp, unix, control:
        fds = ",".join(str(s.fileno()) for s in socks)
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, fds, "data:data:control", *_receive_args(tmp_path)],
            pass_fds=tuple(s.fileno() for s in socks),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")},
        )
        data_addrs = [f"tcp:127.0.0.1:{tcp.getsockname()[1]}", f"unix:{tmp_path}/data.sock"]
        control_addr = f"tcp:127.0.0.1:{control.getsockname()[1]}"
    ready = _wait_ready(proc, tmp_path / "ready.json")
    assert ready == {"data": data_addrs, "control": control_addr}
    _migrate(proc, data_addrs, control_addr, tmp_path)


def test_a_socket_that_is_not_listening_is_a_usage_error(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    fd = a.fileno()
    with a, b:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "vfiomig",
                *_receive_args(tmp_path),
                "--listen",
                f"fd:{a.fileno()}",
            ],
            pass_fds=(a.fileno(),),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"vfiomig: error: fd:{fd} is a socket that is not listening (listen() it first)\n"
    )


def test_listen_fds_for_another_process_are_ignored(tmp_path: Path) -> None:
    """LISTEN_PID names another process (the variables leaked from a parent): no sockets."""
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "data"}
    proc = subprocess.run(
        [sys.executable, "-m", "vfiomig", *_receive_args(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "no data listener: pass --listen ADDR" in proc.stderr


def test_systemd_socket_activate_hands_over_named_sockets(tmp_path: Path) -> None:
    """systemd's own tool binds the sockets, waits for the first connection and execs the
    receiver with LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID, as a socket unit would."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        if os.environ.get("CI"):
            raise AssertionError("systemd-socket-activate is missing (package systemd)")
        pytest.skip("systemd-socket-activate is not installed")
    data, control = tmp_path / "data.sock", tmp_path / "control.sock"
    proc = subprocess.Popen(
        [
            *(tool, "-l", str(data), "-l", str(control), "--fdname=data:control"),
            *(sys.executable, "-m", "vfiomig", *_receive_args(tmp_path)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")},
    )
    deadline = time.monotonic() + 20
    while not (data.exists() and control.exists()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    # The receiver starts on the first connection (a control connection that leaves).
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(str(control))
    probe.close()
    ready = _wait_ready(proc, tmp_path / "ready.json")
    assert ready == {"data": [f"unix:{data}"], "control": f"unix:{control}"}
    _migrate(proc, [f"unix:{data}"], f"unix:{control}", tmp_path)
    # The ready file goes with the process; the socket files are the supervisor's.
    assert not (tmp_path / "ready.json").exists()
    assert data.exists() and control.exists()
