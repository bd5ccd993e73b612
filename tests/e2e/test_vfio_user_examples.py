"""The vfio-user examples, run as a user would: the destination's BARs must match."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("vfio_user_bar_migration.py", ["--channels", "3", "--bar-size", "300000"]),
        ("embedded_receiver.py", []),
    ],
)
def test_example_migrates_bars(script: str, args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")
