"""The receive process as a supervisor sees it (real processes, see `tests.e2e.forked`):
it cleans up what it created on every exit it controls, refuses a path a live receiver
serves, stops on every stop signal with its summary, fails cleanly on a full disk, tells
systemd when it is ready and how it is doing, and bounds the wait for its first channel;
usage errors are one line (JSON under --log-format json), never a traceback."""

from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.forked import Forked, wait_ready
from tests.e2e.specsender import config_blob, send_streams
from vfiomig.testing import channel_streams, device_packets, synth_config

UUID = "00112233-4455-6677-8899-aabbccddeeff"
UUID_BYTES = bytes.fromhex(UUID.replace("-", ""))
DEV = "0000:00:04.0/vfio"
STATE = bytes(range(256)) * 100


def receive_argv(tmp: Path, *extra: str, listen: str = "tcp:127.0.0.1:0") -> list[str]:
    return [
        "receive", "--listen", listen, "--channels", "2", "--uuid", UUID, "--json",
        "--ready-file", str(tmp / "ready.json"), *extra,
    ]  # fmt: skip


def migrate(data: str, config: bytes = b"") -> None:
    packets = device_packets(DEV, 0, STATE, config or synth_config(1), 4096)
    send_streams(data, channel_streams(packets, 2, UUID_BYTES, seed=2))


def rundir(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return run


def test_a_second_receiver_on_a_live_path_is_refused_and_files_go_at_exit(tmp_path: Path) -> None:
    run = rundir(tmp_path)
    data, ctl = run / "data.sock", run / "ctl.sock"
    args = ["--device", f"{DEV}=null:", "--config-out", str(tmp_path), "--gate", "open"]
    first = Forked(
        receive_argv(tmp_path, *args, "--control", f"unix:{ctl}", listen=f"unix:{data}"),
        tmp_path,
        "first",
    )
    wait_ready(first, tmp_path / "ready.json")
    second = Forked(
        [*receive_argv(run, *args, listen=f"unix:{data}")], tmp_path, "second"
    )  # same data path, its own ready file
    assert second.wait(20) == 2, second.stderr
    assert "a live listener answers there" in second.stderr
    assert len(second.stderr.splitlines()) == 1
    assert not (run / "ready.json").exists()
    migrate(f"unix:{data}")  # the first still serves its path
    assert first.wait(30) == 0, first.stderr
    for path in (data, ctl, tmp_path / "ready.json"):
        assert not path.exists(), path
    # A stale socket file (its listener gone without removing it) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(data))
    stale.close()
    third = Forked(receive_argv(tmp_path, *args, listen=f"unix:{data}"), tmp_path, "third")
    wait_ready(third, tmp_path / "ready.json")
    migrate(f"unix:{data}")
    assert third.wait(30) == 0, third.stderr
    assert not data.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_every_stop_signal_aborts_with_the_summary_and_cleans_up(
    tmp_path: Path, sig: signal.Signals
) -> None:
    run = rundir(tmp_path)
    proc = Forked(
        receive_argv(
            tmp_path, "--device", f"{DEV}=null:", "--control", f"unix:{run}/ctl",
            listen=f"unix:{run}/data",
        ),
        tmp_path,
        "rx",
    )  # fmt: skip
    wait_ready(proc, tmp_path / "ready.json")
    proc.kill(sig)
    assert proc.wait(20) == 1, proc.stderr
    assert f"{DEV}/0: migration aborted: received {sig.name}" in proc.stderr
    assert json.loads(proc.stdout)["ok"] is False
    assert list(run.iterdir()) == [] and not (tmp_path / "ready.json").exists()


def _small_files() -> None:  # in the receiver's process: a "disk" that takes 16 KiB a file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))


def test_a_full_disk_fails_the_config_write_and_leaves_no_part_file(tmp_path: Path) -> None:
    out = tmp_path / "configs"
    out.mkdir()
    proc = Forked(
        receive_argv(tmp_path, "--device", f"{DEV}=null:", "--config-out", str(out)),
        tmp_path,
        "rx",
        before=_small_files,
    )
    info = wait_ready(proc, tmp_path / "ready.json")
    migrate(str(info["data"][0]), config_blob(bytes(100_000)))  # type: ignore[index]
    assert proc.wait(30) == 1, proc.stderr
    assert "File too large (errno 27)" in proc.stderr
    assert list(out.iterdir()) == []  # neither the config nor its .part


def test_systemd_notify_ready_status_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    proc = Forked(
        receive_argv(tmp_path, "--device", f"{DEV}=null:", "--config-out", str(tmp_path)),
        tmp_path,
        "rx",
        env={"NOTIFY_SOCKET": str(path)},
    )
    first = sock.recv(4096).decode()
    assert first.startswith("READY=1\nSTATUS=waiting for data channels on tcp:127.0.0.1:")
    info = json.loads((tmp_path / "ready.json").read_text())  # written before READY=1
    migrate(str(info["data"][0]))
    assert proc.wait(30) == 0, proc.stderr
    lines = [first]
    sock.settimeout(2)
    while not lines[-1].startswith("STOPPING=1"):
        lines.append(sock.recv(4096).decode())
    assert lines[-1] == "STOPPING=1\nSTATUS=every device loaded\n"
    sock.close()


def test_first_channel_timeout_ends_a_wait_for_no_sender(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = Forked(
        receive_argv(
            tmp_path, "--device", f"{DEV}=null:", "--config-out", str(tmp_path),
            "--first-channel-timeout", "1.5",
        ),
        tmp_path,
        "rx",
    )  # fmt: skip
    assert proc.wait(20) == 1, proc.stderr
    assert time.monotonic() - start < 15
    err = proc.stderr
    assert "no data channel yet: waited" in err  # the lines while it waited
    assert f"{DEV}/0: not loaded: no data channel within 1.5 s (listening on tcp:127.0.0.1:" in err
    assert not (tmp_path / "ready.json").exists()


def _vfiomig(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vfiomig", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--device", f"{DEV}=null:", "--device", f"{DEV}/0=null:"],
            f"--device {DEV}/0 is given twice (null: and null:): each device once",
        ),
        (
            ["--device", f"{DEV}=null:", "--listen", "tcp://10.0.0.2:4444"],
            "address 'tcp://10.0.0.2:4444' is a URI: write tcp:10.0.0.2:4444 (no //)",
        ),
    ],
)
def test_usage_errors_are_one_line_text_or_json(args: list[str], message: str) -> None:
    base = ["receive", "--channels", "1", "--uuid", UUID, "--config-out", "/tmp"]
    base += ["--listen", "tcp:127.0.0.1:0", *args] if "--listen" not in args else args
    text = _vfiomig(*base)
    assert text.returncode == 2 and text.stderr.count("\n") == 1, text.stderr
    assert message in text.stderr
    logs = _vfiomig("--log-format", "json", *base)
    assert logs.returncode == 2
    (line,) = logs.stderr.splitlines()
    record = json.loads(line)
    assert record["event"] == "usage_error" and message in record["fields"]["reason"]
    # An argparse error is a JSON record too, and the send side has the same check.
    bad = _vfiomig("send", "--log-format", "json", "--channels", "0")
    assert bad.returncode == 2
    assert json.loads(bad.stderr)["event"] == "usage_error"


def test_a_sink_that_cannot_start_is_one_line_every_run(tmp_path: Path) -> None:
    """The sink fails before every listener and extra task is up: the one-line error,
    never a trio traceback (it came in 2 of 3 runs on a slow machine)."""
    run = rundir(tmp_path)
    for n in range(5):
        proc = Forked(
            receive_argv(
                tmp_path, "--device", f"{DEV}=vfio:/no/such/path", "--control",
                f"unix:{run}/ctl{n}",
            ),
            tmp_path,
            f"rx{n}",
        )  # fmt: skip
        assert proc.wait(20) == 1, proc.stderr
        err = proc.stderr
        assert "Traceback" not in err and "ExceptionGroup" not in err, err
        assert f"{DEV}/0: starting sink vfio:/no/such/path failed" in err
        assert json.loads(proc.stdout)["ok"] is False
    assert list(run.iterdir()) == [] and not (tmp_path / "ready.json").exists()
