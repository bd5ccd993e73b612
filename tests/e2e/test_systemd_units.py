"""The systemd units in contrib/systemd as an administrator would deploy them:
`systemd-analyze verify` finds nothing to say, `systemd-analyze security` rates the
service 4.0 or better, both socket units can be enabled, and the env file works as an
EnvironmentFile and with a shell's `source`.

systemd is installed from Debian when missing (CI images have apt-get): under CI these
tests never skip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "contrib" / "systemd"
VFIOMIG = Path(shutil.which("vfiomig") or ROOT / ".venv" / "bin" / "vfiomig")


@pytest.fixture(scope="module")
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"],
        ):
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            raise AssertionError("systemd-analyze is missing and could not be installed")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return tool


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units, with ExecStart= pointing at this checkout's vfiomig (verify checks that
    the binary exists)."""
    for unit in UNITS.glob("*@.*"):
        text = unit.read_text().replace("/usr/local/bin/vfiomig", str(VFIOMIG))
        (tmp_path / unit.name).write_text(text)
    return tmp_path


INSTANCES = ["vfiomig-receive@vm42.service", "vfiomig-receive@vm42.socket",
             "vfiomig-control@vm42.socket"]  # fmt: skip


def test_units_verify_clean(analyze: str, units: Path) -> None:
    assert VFIOMIG.exists(), VFIOMIG
    done = subprocess.run(
        [analyze, "verify", *(str(units / name) for name in INSTANCES)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done


def test_service_exposure_is_at_most_4(analyze: str, units: Path) -> None:
    done = subprocess.run(
        [analyze, "security", "--offline=yes", str(units / INSTANCES[0])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout + done.stderr)
    assert found, done
    assert float(found.group(1)) <= 4.0, done.stdout


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_service_notifies_and_both_sockets_install() -> None:
    service = _directives((UNITS / "vfiomig-receive@.service").read_text())
    assert service["Type"] == ["notify"]
    assert "/dev/iommu rw" in service["DeviceAllow"] and "char-vfio rw" in service["DeviceAllow"]
    assert service["DynamicUser"] == ["yes"] and service["PrivateNetwork"] == ["yes"]
    for socket_unit in ("vfiomig-receive@.socket", "vfiomig-control@.socket"):
        text = (UNITS / socket_unit).read_text()
        assert "[Install]" in text and "WantedBy=sockets.target" in text, socket_unit


def test_env_file_sources_in_a_shell_as_systemd_reads_it() -> None:
    script = (
        f'set -a; . "{UNITS / "example.env"}"; set +a; printf "%s|" "$UUID" "$CHANNELS" $DEVICES'
    )
    done = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "5c6e8d2a-9b3f-4c1d-8e7a-6b5c4d3e2f10|4|--device|0000:00:04.0/vfio=attach:|"
    )
