"""`vfiomig.bench._cpu`: a process's CPU and CPU wait over a window, from its threads'
schedstat, with the counts of threads that ended kept (bounds generous: the machine is
shared)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vfiomig.bench._cpu import ProcClock, read_schedstat

SPIN = "t = time.monotonic()\nwhile time.monotonic() - t < {s}: pass\n"
CHILD = {
    "spin": SPIN.format(s=0.4),
    "sleep": "time.sleep(0.4)\n",
    # a thread spins 0.3 s and ends; the process lives on, asleep
    "thread": "import threading\ndef f():\n    "
    + SPIN.format(s=0.3).replace("\n", "\n    ")
    + "\nth = threading.Thread(target=f)\nth.start()\nth.join()\ntime.sleep(0.2)\n",
}


def _sampled(what: str) -> tuple[ProcClock, float, float]:
    code = "import sys, time\nprint('go', flush=True)\n" + CHILD[what]
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        clock = ProcClock(proc.pid)
        assert clock.sample()
        deadline = time.monotonic() + 30
        # Until it exits (then it is a zombie until reaped: its files still read).
        while proc.poll() is None and time.monotonic() < deadline:
            clock.sample()
            time.sleep(0.005)
        clock.sample()
        assert proc.wait(timeout=1) == 0
    assert not clock.sample()  # reaped: gone
    return clock, clock.times[0], clock.times[-1]


@pytest.mark.skipif(read_schedstat(1) is None, reason="no /proc schedstat here")
def test_busy_and_idle_processes() -> None:
    spin, a, b = _sampled("spin")
    u = spin.usage(a, b)
    # It ran, or wanted to, all the time (a busy machine turns running into waiting).
    assert u.wanted > 0.7, u
    sleep, a, b = _sampled("sleep")
    u = sleep.usage(a, b)
    assert u.busy < 0.3 and u.wanted < 0.5, u


@pytest.mark.skipif(read_schedstat(1) is None, reason="no /proc schedstat here")
def test_a_thread_that_ended_still_counts() -> None:
    clock, a, b = _sampled("thread")
    u = clock.usage(a, b)
    assert u.cpu + u.wait > 0.2, u  # the thread's 0.3 s of spinning, kept after it ended
    totals = [cpu for cpu, _ in clock.samples]
    assert totals == sorted(totals)  # never goes back when a thread ends
