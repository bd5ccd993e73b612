"""The ``vfiomig`` command as a real process at the cost of a fork: the test process has
imported it once, each run is a forked child that calls the command's entry point with its
own argv, stdout and stderr (files), and exits with the command's status. A process of its
own (sockets, signals, exit status) without an interpreter start and imports per run
(~0.5 s of CPU each), so a test can run a command 20 times to show it fails every time.

Fork only from a test with no threads and no trio run of its own (a synchronous test).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vfiomig.cli._main import run as vfiomig_command


class Forked:
    """One forked ``vfiomig`` run; ``out`` and ``err`` are its stdout and stderr files.
    ``env`` is added to the child's environment and ``before`` runs in the child first
    (a resource limit, say)."""

    def __init__(
        self,
        argv: Sequence[str],
        logs: Path,
        name: str,
        *,
        env: dict[str, str] | None = None,
        before: Callable[[], None] | None = None,
    ) -> None:
        self.out = logs / f"{name}.out"
        self.err = logs / f"{name}.err"
        out_fd = os.open(self.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err_fd = os.open(self.err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.pid = os.fork()
        if self.pid == 0:  # the child: the command, then os._exit (run never returns)
            try:
                os.dup2(out_fd, 1)
                os.dup2(err_fd, 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.environ.update(env or {})
                if before is not None:
                    before()
                sys.argv = ["vfiomig", *argv]
                vfiomig_command()
            finally:
                os._exit(70)
        os.close(out_fd)
        os.close(err_fd)
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"vfiomig did not exit within {timeout} s: {self.stderr}")
            time.sleep(0.01)
        assert self.code is not None
        return self.code

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def wait_ready(proc: Forked, ready: Path, timeout: float = 20) -> dict[str, object]:
    """The receiver's ready file, once it is there."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"receiver did not start ({proc.poll()}): {proc.stderr}")
        time.sleep(0.01)
    addresses: dict[str, object] = json.loads(ready.read_text())
    return addresses
