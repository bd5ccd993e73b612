"""Linux's mtty sample driver in a VM, as a real kernel VFIO device for the tests.

`run_guest()` runs ``../shared/tools/mtty-vm`` (beside the checkout) once with
``python -m tests.mtty_guest`` as the guest command, using this test run's own interpreter
and checkout (the guest sees the host's file system read-only), and returns the guest's
report. The tool's work directory is a per-machine cache keyed by the tool's text
(``~/.cache/vfiomig/mtty-vm-HASH``, or ``$VFIOMIG_MTTY_CACHE``): its first run installs
the packages (about 80 s) and builds mtty.ko, later runs only boot. One VM at a time per
cache (a lock), since the tool's first steps write into it.

The ``mtty_run`` fixture in tests/conftest.py wraps it: it skips only where the tool
cannot run (no tool beside the checkout, not root, not Debian 12), and never under CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT.parent / "shared" / "tools" / "mtty-vm"
#: The whole run: package install on a fresh machine, build, boot, guest work.
TIMEOUT = 1200


class VmUnavailable(Exception):
    """The tool cannot run on this machine."""


@dataclass(frozen=True, slots=True)
class GuestRun:
    report: dict[str, Any]
    seconds: float
    log: str


def _cache_dir() -> Path:
    digest = hashlib.sha256(TOOL.read_bytes()).hexdigest()[:12]
    base = Path(os.environ.get("VFIOMIG_MTTY_CACHE", Path.home() / ".cache" / "vfiomig"))
    return base / f"mtty-vm-{digest}"


def _check() -> None:
    if not TOOL.is_file():
        raise VmUnavailable(f"{TOOL} not found")
    if os.geteuid() != 0:
        raise VmUnavailable("mtty-vm must run as root (apt, insmod in the guest)")
    try:
        version = Path("/etc/debian_version").read_text()
    except OSError:
        version = ""
    if not version.startswith("12"):
        raise VmUnavailable("mtty-vm needs Debian 12 (its 6.12 kernel packages)")


def run_guest() -> GuestRun:
    """Boot once, run tests/mtty_guest.py, return its report (or raise with the log)."""
    _check()
    work = _cache_dir()
    out = work / "out" / uuid.uuid4().hex  # per run: test runs may share the cache
    out.mkdir(parents=True)
    guest = f"cd {ROOT} && exec {sys.executable} -m tests.mtty_guest {out}"
    start = time.monotonic()
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            ["bash", str(TOOL), str(work), "--", "sh", "-c", guest],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    seconds = time.monotonic() - start
    log = proc.stdout + proc.stderr
    report_file = out / "report.json"
    try:
        if proc.returncode != 0 or not report_file.is_file():
            raise RuntimeError(
                f"mtty-vm exited {proc.returncode} without a report; its log:\n{log[-6000:]}"
            )
        report: dict[str, Any] = json.loads(report_file.read_text())
    finally:
        for name in out.iterdir():
            name.unlink()
        out.rmdir()
    return GuestRun(report=report, seconds=seconds, log=log)
