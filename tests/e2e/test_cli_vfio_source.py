"""`vfiomig send --device X=vfio:PATH` as a real process (a fake kernel device behind it,
see `tests.e2e.fakevfio_send`) into `vfiomig receive` as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.receive_args import DEV, UUID_TEXT, out_file, receive_args
from tests.e2e.specsender import Receiver


def send(
    tmp: Path, rx: Receiver, model: dict[str, object], *extra: str
) -> subprocess.CompletedProcess[str]:
    control = rx.addresses["control"]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.e2e.fakevfio_send",
            json.dumps(model),
            str(tmp / "fake"),
            "send",
            "--connect",
            rx.data,
            "--channels",
            "3",
            "--uuid",
            UUID_TEXT,
            "--device",
            f"{DEV}/0=vfio:{{device}}",
            "--control",
            control,
            "--packet-size",
            "64KiB",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def fake_result(tmp: Path) -> tuple[dict[str, Any], bytes]:
    return json.loads((tmp / "fake.json").read_text()), (tmp / "fake.saved").read_bytes()


@pytest.mark.parametrize("rounds", ["8", "0"])
def test_vfio_source_cli_with_and_without_precopy(tmp_path: Path, rounds: str) -> None:
    rx = Receiver(
        tmp_path,
        receive_args(tmp_path, [(DEV, 0)], 3, "--control", f"unix:{tmp_path}/ctl.sock"),
    )
    model = {"stop_copy": 400_000, "initial": 1_500_000, "dirty": [200_000, 30_000], "seed": 7}
    result = send(tmp_path, rx, model, "--precopy-threshold", "64KiB", "--precopy-rounds", rounds)
    assert result.returncode == 0, result.stderr
    code, _, err = rx.wait()
    assert code == 0, err
    fake, saved = fake_result(tmp_path)
    assert out_file(tmp_path, DEV, 0) == saved
    summary = json.loads(result.stdout)
    if rounds == "0":
        assert len(saved) == 1_500_000 + 400_000 and summary["precopy"] == {}
        assert summary["bytes"] == 1_900_000  # all of it while the device is stopped
    else:
        assert len(saved) == 1_500_000 + 230_000 + 400_000
        assert summary["precopy"][f"{DEV}/0"] == {
            "rounds": 2,
            "bytes": 1_700_000,
            "pending": [1_500_000, 200_000, 30_000],
            "stopped": "converged",
        }
        # 30 000 dirty bytes were under the threshold: they and the STOP_COPY data went
        # as multifd packets after switchover.
        assert summary["bytes"] == 430_000
        assert fake["arcs"][0] == ["RUNNING", "PRE_COPY"]
    assert fake["state"] == "STOP" and fake["resets"] == 0


def test_vfio_source_cli_read_error_exits_1_device_running(tmp_path: Path) -> None:
    rx = Receiver(
        tmp_path,
        receive_args(tmp_path, [(DEV, 0)], 3, "--control", f"unix:{tmp_path}/ctl.sock"),
    )
    model = {"stop_copy": 400_000, "initial": 100_000, "read_errno_at": [300_000, 5]}
    result = send(tmp_path, rx, model, "--precopy-threshold", "1KiB")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"vfiomig: send failed: {DEV}/0: reading source vfio:")
    assert "reading the data fd failed in STOP_COPY at byte 300000" in line
    assert "Input/output error" in line and "device back in RUNNING from STOP_COPY" in line
    code, _, err = rx.wait()
    assert code == 1 and "abort" in err
    fake, _ = fake_result(tmp_path)
    assert fake["state"] == "RUNNING" and fake["resets"] == 0
