"""CPU time per process during a run: how busy the receiver and the sender were.

The bench says what limited a run (`_stats.limit`); "the receiver's CPU" or "the sender"
needs each process's CPU over the transfer, not over its life (the sender's interpreter
start-up alone costs more CPU than a short transfer). `ProcClock` samples a process's
``/proc/PID/task/*/schedstat`` every `INTERVAL`: per thread the nanoseconds run on a CPU
and the nanoseconds spent runnable but waiting for one. The difference of two samples is
the process's CPU time and its wait for a CPU between them; a window is taken between the
last sample at or before its start and the last sample at or before its end, so it errs
by at most one interval at each edge.

It depends on nothing inside the sender: the bench knows its pid, and the kernel keeps the
counts. Where /proc has no schedstat the figures are NaN and no limit is blamed on CPU.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from dataclasses import dataclass

import trio

INTERVAL = 0.01


def read_schedstat(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable and waiting) summed over ``pid``'s threads,
    or None when the process is gone or the kernel has no schedstat."""
    reader = _Schedstat(pid)
    try:
        return reader.read()
    finally:
        reader.close()


class _Schedstat:
    """``pid``'s threads' schedstat files, kept open: a sample is a pread per thread (a
    few microseconds), the thread list is read again every `RESCAN` samples, and a
    thread that ended keeps the counts it had."""

    RESCAN = 10

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fds: dict[str, int] = {}
        self.last: dict[str, tuple[int, int]] = {}
        self.ended = (0, 0)
        self.n = 0

    def _rescan(self) -> bool:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return False
        for tid in tids:
            if tid not in self.fds:
                try:
                    self.fds[tid] = os.open(f"/proc/{self.pid}/task/{tid}/schedstat", os.O_RDONLY)
                except OSError:
                    continue  # the thread ended between the listing and the open
        return True

    def read(self) -> tuple[float, float] | None:
        if self.n % self.RESCAN == 0 and not self._rescan():
            return None
        self.n += 1
        run, wait = self.ended
        for tid, fd in list(self.fds.items()):
            try:
                fields = os.pread(fd, 128, 0).split()
                now = (int(fields[0]), int(fields[1]))
            except (OSError, IndexError, ValueError):
                os.close(self.fds.pop(tid))
                old = self.last.pop(tid, (0, 0))
                self.ended = (self.ended[0] + old[0], self.ended[1] + old[1])
                run, wait = run + old[0], wait + old[1]
                continue
            self.last[tid] = now
            run, wait = run + now[0], wait + now[1]
        if not self.fds:
            return None
        return run / 1e9, wait / 1e9

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


@dataclass(frozen=True, slots=True)
class Usage:
    """A process over a window: CPU seconds, seconds waiting for a CPU, window seconds."""

    cpu: float
    wait: float
    wall: float

    @property
    def busy(self) -> float:
        """The fraction of the window the process ran (1.0: one CPU, all the time)."""
        return self.cpu / self.wall if self.wall > 0 else math.nan

    @property
    def wanted(self) -> float:
        """The fraction it ran or wanted to (ran + waited for a CPU): near 1 or above,
        the process had work all the time, so CPU was its limit."""
        return (self.cpu + self.wait) / self.wall if self.wall > 0 else math.nan


NO_USAGE = Usage(math.nan, math.nan, math.nan)


class ProcClock:
    """Samples of one process's CPU and CPU wait, stamped with ``time.monotonic()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.times: list[float] = []
        self.samples: list[tuple[float, float]] = []
        self.costs: list[float] = []  # CPU seconds each sample took (this thread's)
        self._reader = _Schedstat(pid)

    def sample(self) -> bool:
        """Take one sample; False once the process is gone (its files are then closed)."""
        t0 = time.thread_time()
        now = time.monotonic()
        got = self._reader.read()
        if got is None:
            self._reader.close()
            return False
        self.times.append(now)
        self.samples.append(got)
        self.costs.append(time.thread_time() - t0)
        return True

    def close(self) -> None:
        self._reader.close()

    def cost(self, start: float, end: float) -> float:
        """Seconds the samples between ``start`` and ``end`` took (harness time)."""
        lo, hi = bisect.bisect_left(self.times, start), bisect.bisect_right(self.times, end)
        return sum(self.costs[lo:hi])

    def at(self, t: float) -> tuple[float, float] | None:
        """The last sample at or before ``t``."""
        i = bisect.bisect_right(self.times, t) - 1
        return self.samples[i] if i >= 0 else None

    def usage(self, start: float, end: float) -> Usage:
        """The process between ``start`` and ``end`` (monotonic seconds)."""
        a, b = self.at(start), self.at(end)
        if a is None or b is None or end <= start:
            return NO_USAGE
        return Usage(b[0] - a[0], b[1] - a[1], end - start)


async def watch(clocks: list[ProcClock]) -> None:
    """Sample ``clocks`` every `INTERVAL` until cancelled; a clock whose process is gone
    is no longer sampled. Cancellation: closes the clocks' files. What the samples cost
    during a run is the harness's (`ProcClock.cost`)."""
    live = list(clocks)
    try:
        while live:
            live = [c for c in live if c.sample()]
            await trio.sleep(INTERVAL)
        await trio.sleep_forever()
    finally:
        for c in clocks:
            c.close()


__all__ = ["INTERVAL", "NO_USAGE", "ProcClock", "Usage", "read_schedstat", "watch"]
