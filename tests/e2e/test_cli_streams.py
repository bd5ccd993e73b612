"""The command's streams: results on stdout, progress, logs and errors on stderr."""

from __future__ import annotations

import subprocess
import sys

import vfiomig


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
