"""Linux's mtty sample driver in a VM, as a real kernel VFIO device for the tests.

`run_guest()` runs ``../shared/tools/mtty-vm`` (beside the checkout) once with
``python -m tests.mtty_guest`` as the guest command, using this test run's own interpreter
and checkout (the guest sees the host's file system read-only), and returns the guest's
report. The tool's work directory is a per-machine cache keyed by the tool's text
(``~/.cache/vfiomig/mtty-vm-HASH``, or ``$VFIOMIG_MTTY_CACHE``): its first run installs
the packages (about 80 s) and builds mtty.ko, later runs only boot. One VM at a time per
cache (a lock), since the tool's first steps write into it.

`background()` starts that run in a thread of the test process, once: tests/conftest.py
starts it as soon as the collected tests need it, so that the VM (minutes of CPU under
TCG on a fresh machine, package install included) runs while the rest of the suite does;
tests/vm/ is collected last and waits for it. Its ``mtty_run`` fixture skips only where
the tool cannot run (no tool beside the checkout, not root, not Debian 12), and never
under CI (``CI=true``), where that is a failure. `Background.stop` ends a VM still
running when the session ends (a test run interrupted, or the tests deselected late).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
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


def run_guest(started: Callable[[subprocess.Popen[str]], None] = lambda proc: None) -> GuestRun:
    """Boot once, run tests/mtty_guest.py, return its report (or raise with the log).

    ``started`` gets the tool's process (its own session: `Background.stop` kills the
    whole group, QEMU included)."""
    _check()
    work = _cache_dir()
    out = work / "out" / uuid.uuid4().hex  # per run: test runs may share the cache
    out.mkdir(parents=True)
    guest = f"cd {ROOT} && exec {sys.executable} -m tests.mtty_guest {out}"
    start = time.monotonic()
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            ["bash", str(TOOL), str(work), "--", "sh", "-c", guest],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        started(proc)
        try:
            log, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill(proc)
            log, _ = proc.communicate()
            log += f"\n(killed after {TIMEOUT} s)"
    seconds = time.monotonic() - start
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


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Background:
    """`run_guest` in a daemon thread; `wait` for its result (or its exception)."""

    def __init__(self) -> None:
        #: When the run started, and how long tests were blocked waiting for it: what the VM
        #: added to the suite's wall time (the rest ran beside the other tests).
        self.started = time.monotonic()
        self.waited = 0.0
        self._result: GuestRun | None = None
        self._error: BaseException | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._run, name="mtty-vm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = run_guest(started=self._started)
        except BaseException as exc:  # handed to the waiting test
            self._error = exc

    def _started(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc

    def wait(self) -> GuestRun:
        start = time.monotonic()
        self._thread.join(TIMEOUT + 60)
        self.waited += time.monotonic() - start
        if self._thread.is_alive():
            raise RuntimeError(f"the mtty VM run did not end within {TIMEOUT + 60} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def stop(self) -> None:
        if self._proc is not None:
            _kill(self._proc)


_background: Background | None = None


def background() -> Background:
    """The one background run of this test session, started on the first call."""
    global _background
    if _background is None:
        _background = Background()
    return _background


def stop_background() -> None:
    if _background is not None:
        _background.stop()


def summary() -> str | None:
    """One line for the end of the test run: the VM's time and what it added."""
    run = _background
    if run is None or run._result is None:
        return None
    result = run._result
    guest = result.report.get("seconds", {}).get("total")
    return (
        f"mtty VM: {result.seconds:.0f} s in the background (guest work {guest} s); "
        f"tests waited {run.waited:.0f} s for it"
    )
