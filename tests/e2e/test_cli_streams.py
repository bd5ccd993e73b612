"""The command's streams: results on stdout, progress, logs and errors on stderr."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import vfiomig
from tests.e2e.specsender import Receiver, config_blob, packet, send_streams, spread

UUID_TEXT = "5c6e8d2a-9b3f-4c1d-8e7a-6b5c4d3e2f10"
UUID = bytes.fromhex(UUID_TEXT.replace("-", ""))
DEV = "0000:00:04.0/vfio"


def _vfiomig(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vfiomig", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_demo_reports_on_stdout_and_draws_nothing_off_a_terminal() -> None:
    proc = _vfiomig("demo", "--size", "8M")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("vfiomig demo: 2 devices x 8 MiB")
    assert sum("verified" in line for line in lines) == 2
    assert lines[-1] == "demo: ok"
    assert proc.stderr == ""  # no progress bar into a pipe


def test_version_on_stdout() -> None:
    proc = _vfiomig("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"vfiomig {vfiomig.__version__}\n"


def test_send_usage_error_names_the_option_in_one_line() -> None:
    proc = _vfiomig(
        "send", "--connect", "fd:3", "--channels", "1", "--uuid", "0" * 32, "--device", "d=synth:1M"
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("vfiomig send: error: argument --connect: fd:3 is a listening")
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stderr.splitlines()]
    for r in records:
        assert set(r) >= {"time", "level", "device", "event", "fields", "message"}, r
        assert r["time"].endswith("Z") and r["level"] in ("debug", "info", "warning", "error")
    return records


def test_json_logs_name_qemu_trace_points(tmp_path: Path) -> None:
    state = bytes(range(256)) * 1024  # 256 KiB in 4 packets
    config = config_blob(b"cfg")
    packets = [packet(DEV, 0, i, 0, state[i * 65536 : (i + 1) * 65536]) for i in range(4)]
    packets.append(packet(DEV, 0, 4, 1, config))
    rx = Receiver(
        tmp_path,
        [
            "--channels", "2", "--uuid", UUID_TEXT, "--config-out", str(tmp_path),
            "--device", f"{DEV}=file:{tmp_path / 'out'}", "-vv", "--log-format", "json",
        ],
    )  # fmt: skip
    send_streams(rx.data, spread(packets, 2, UUID, lambda k: k % 2))
    code, out, err = rx.wait()
    assert code == 0, err
    assert out == ""  # no --json: nothing on stdout
    records = _json_lines(err)
    mine = [r for r in records if r["device"] == f"{DEV}/0"]
    events = [r["event"] for r in mine]
    assert events.count("vfio_load_state_device_buffer_incoming") == 5
    assert {r["fields"]["idx"] for r in mine if r["event"].endswith("_incoming")} == set(range(5))
    order = [
        "vfio_load_state_device_buffer_start",
        "vfio_load_state_device_buffer_load_start",
        "vfio_load_state_device_buffer_load_end",
        "vfio_load_device_config_state_start",
        "vfio_load_device_config_state_end",
        "vfio_load_state_device_buffer_end",
    ]
    firsts = [events.index(e) for e in order]
    assert firsts == sorted(firsts), events
    end = mine[events.index("vfio_load_state_device_buffer_end")]
    assert end["fields"]["bytes"] == len(state) and end["level"] == "info"
    assert "gate_open" in events and "channel_accepted" in {r["event"] for r in records}


def test_json_logs_carry_the_failure_line(tmp_path: Path) -> None:
    """A failed migration: exit 1 and its one line per device as an error record."""
    packets = [packet(DEV, 0, 0, 0, b"x" * 100), packet(DEV, 0, 2, 1, config_blob(b"c"))]
    rx = Receiver(
        tmp_path,
        [
            "--channels", "1", "--uuid", UUID_TEXT, "--config-out", str(tmp_path),
            "--device", f"{DEV}=null:", "--log-format", "json",
        ],
    )  # fmt: skip
    send_streams(rx.data, spread(packets, 1, UUID, lambda k: 0))
    code, _out, err = rx.wait()
    assert code == 1
    (failure,) = [r for r in _json_lines(err) if r["event"] == "migration_failed"]
    assert failure["level"] == "error" and failure["device"] == f"{DEV}/0"
    assert "missing idx 1" in failure["message"]


def _read_terminal(master: int) -> str:
    seen = bytearray()
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return seen.decode(errors="replace")


def _on_terminal(args: list[str]) -> tuple[subprocess.Popen[str], Future[str]]:
    """``vfiomig ARGS`` with stderr on a pty (read in a thread) and stdout on a pipe."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfiomig", *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    os.close(slave)
    return proc, ThreadPoolExecutor(1).submit(_read_terminal, master)


def test_demo_draws_its_progress_bar_on_a_terminal_only() -> None:
    """stderr a terminal: the bar is drawn in place there and erased; stdout is unchanged."""
    proc, reader = _on_terminal(["demo", "--size", "64M"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert out.splitlines()[-1] == "demo: ok"
    drawn = reader.result(timeout=10)
    assert "\r  [" in drawn and "MiB landed" in drawn
    assert drawn.endswith("\r")


def test_receive_draws_its_status_line_on_a_terminal(tmp_path: Path) -> None:
    state = bytes(range(256)) * 4096  # 1 MiB in 16 packets, slowly: the line gets drawn
    packets = [packet(DEV, 0, i, 0, state[i * 65536 : (i + 1) * 65536]) for i in range(16)]
    packets.append(packet(DEV, 0, 16, 1, config_blob(b"cfg")))
    ready = tmp_path / "ready.json"
    proc, reader = _on_terminal(
        [
            "receive", "--listen", "tcp:127.0.0.1:0",
            "--ready-file", str(ready), "--channels", "1", "--uuid", UUID_TEXT,
            "--config-out", str(tmp_path), "--device", f"{DEV}=file:{tmp_path / 'out'}", "--json",
        ]
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    (stream,) = spread(packets, 1, UUID, lambda k: 0)

    def slowly() -> Iterator[bytes]:
        for k in range(0, len(stream), 65536):
            time.sleep(0.05)
            yield stream[k : k + 65536]

    send_streams(json.loads(ready.read_text())["data"][0], [slowly()])
    out, _ = proc.communicate(timeout=60)
    drawn = reader.result(timeout=10)
    assert proc.returncode == 0 and json.loads(out)["ok"] is True
    assert "MiB written" in drawn and "1/1 channels open" in drawn
    assert drawn.endswith("\r")  # erased at the end


def test_send_draws_its_status_line_on_a_terminal(tmp_path: Path) -> None:
    """``vfiomig send`` to a real receiver, paced so that the line is redrawn in the
    stop-copy phase: sent bytes and open channels on stderr, erased at the end."""
    rx = Receiver(
        tmp_path,
        ["--channels", "2", "--uuid", UUID_TEXT, "--config-out", str(tmp_path), "--json",
         "--device", f"{DEV}=file:{tmp_path / 'out'}"],
    )  # fmt: skip
    proc, reader = _on_terminal(
        [
            "send", "--connect", rx.data, "--channels", "2",
            "--uuid", UUID_TEXT, "--device", f"{DEV}=synth:2MiB:3", "--packet-size", "64KiB",
            "--channel-rate", "2MiB", "--json",
        ]
    )  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    drawn = reader.result(timeout=10)
    assert proc.returncode == 0 and json.loads(out)["ok"] is True
    assert "stop-copy:" in drawn and "of 2.0 MiB sent" in drawn and "2 channels open" in drawn
    assert " GB/s, 0:00:0" in drawn and " left, " in drawn  # the rate and the time left
    assert drawn.endswith("\r")
    code, _, err = rx.wait()
    assert code == 0, err


def test_send_json_writes_progress_events_on_stderr(tmp_path: Path) -> None:
    """Off a terminal, ``vfiomig send --json``: a send_progress object a second on stderr
    (paced to last ~2 s), the last one with every byte sent; the summary alone on stdout."""
    rx = Receiver(
        tmp_path,
        ["--channels", "2", "--uuid", UUID_TEXT, "--config-out", str(tmp_path), "--json",
         "--device", f"{DEV}=null:"],
    )  # fmt: skip
    proc = _vfiomig(
        "send", "--connect", rx.data, "--channels", "2", "--uuid", UUID_TEXT,
        "--device", f"{DEV}=synth:4MiB:3", "--packet-size", "64KiB", "--channel-rate", "1MiB",
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    assert len(events) >= 2 and {e["event"] for e in events} == {"send_progress"}
    total = (4 << 20) + 288 * 64
    assert all(e["total_bytes"] == total for e in events)
    assert any(0 < e["sent_bytes"] < total and e["rate"] > 0 for e in events)
    assert events[-1]["sent_bytes"] > total and events[-1]["phase"] == "done"
    code, _, err = rx.wait()
    assert code == 0, err


def test_send_failure_on_a_terminal_is_one_line() -> None:
    """With the progress line drawn, a failed send still ends in its one error line (the
    line's nursery must not wrap the error in a group and print a traceback)."""
    proc, reader = _on_terminal(
        ["send", "--connect", "tcp:127.0.0.1:1", "--channels", "1", "--uuid", UUID_TEXT,
         "--device", f"{DEV}=synth:1MiB:3"]
    )  # fmt: skip
    proc.communicate(timeout=60)
    drawn = reader.result(timeout=10)
    assert proc.returncode == 1
    assert "Traceback" not in drawn
    assert "vfiomig: send failed: channel 0: cannot connect to tcp:127.0.0.1:1" in drawn
