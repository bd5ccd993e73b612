"""A progress line on stderr, redrawn in place, only on a terminal.

Redirected to a file or a pipe, stderr gets no progress at all (logs stay one line each);
nor does it with ``-v`` or ``--log-format json``, whose lines a redrawn bar would tear.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TextIO

import trio

from vfiomig.receive import Session
from vfiomig.send import SendStatus

REDRAW_SECONDS = 0.25


def bar(done: int, total: int, width: int = 32) -> str:
    """``[#####.....]  50.0%`` for ``done`` of ``total``."""
    frac = min(done / total, 1.0) if total else 1.0
    filled = int(frac * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}%"


def wanted(verbose: int, log_format: str, stream: TextIO | None = None) -> bool:
    """Whether to draw progress: stderr is a terminal and no log lines would tear it."""
    return (stream or sys.stderr).isatty() and verbose == 0 and log_format == "text"


async def draw_progress(
    done: trio.Event, describe: Callable[[], str], stream: TextIO | None = None
) -> None:
    """Redraw ``describe()`` on ``stream`` (stderr) until ``done`` is set, then erase it.

    Cancellation: the line is erased and the cancel propagates.
    """
    out = stream or sys.stderr
    width = 0
    try:
        while not done.is_set():
            line = describe()
            out.write("\r" + line.ljust(width))
            out.flush()
            width = max(width, len(line))
            with trio.move_on_after(REDRAW_SECONDS):
                await done.wait()
    finally:
        if width:
            out.write("\r" + " " * width + "\r")
            out.flush()


def receive_status(session: Session) -> str:
    """``12.0 MiB written, 3.0 MiB queued, 1/2 devices loaded, 4/4 channels``."""
    stats = [d.buf.statistics() for d in session.devices.values()]
    written = sum(s.written_bytes for s in stats)
    loaded = sum(1 for s in stats if s.loaded)
    return (
        f"  {written / 2**20:8.1f} MiB written, {session.budget.queued / 2**20:6.1f} MiB queued,"
        f" {loaded}/{len(stats)} devices loaded,"
        f" {session.channels_open}/{session.config.channels} channels open"
    )


class SendProgress:
    """How far a running send is, from successive looks at its `SendStatus`: bytes on the
    wire, the rate over the last few seconds and, when the sources' lengths are known
    (``total``: wire bytes expected, headers included), the time left."""

    WINDOW = 3.0  # seconds the rate is averaged over

    def __init__(self, status: SendStatus, total: int | None = None) -> None:
        self.status = status
        self.total = total
        self.samples: list[tuple[float, int]] = []

    def _look(self) -> tuple[float, float | None]:
        """(rate in bytes/s, seconds left or None)."""
        now = trio.current_time()
        sent = self.status.sent_bytes
        self.samples.append((now, sent))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW:
            self.samples.pop(0)
        t0, s0 = self.samples[0]
        rate = (sent - s0) / (now - t0) if now > t0 else 0.0
        eta = None
        if self.total is not None and rate > 0:
            eta = max(self.total - sent, 0) / rate
        return rate, eta

    def line(self) -> str:
        """``stop-copy: 512.0 of 1024.0 MiB sent, 1.20 GB/s, 0:00:04 left, 4 channels open``."""
        status = self.status
        rate, eta = self._look()
        of = f" of {self.total / 2**20:.1f}" if self.total is not None else ""
        precopy = (
            f" ({status.precopy_bytes / 2**20:.1f} MiB precopy)" if status.precopy_bytes else ""
        )
        left = f", {_clock(eta)} left" if eta is not None else ""
        return (
            f"  {status.phase}: {status.sent_bytes / 2**20:8.1f}{of} MiB sent{precopy},"
            f" {rate / 1e9:.2f} GB/s{left}, {status.channels} channels open"
        )

    def event(self) -> dict[str, object]:
        """The same as one JSON object (``vfiomig send --json``, on stderr)."""
        rate, eta = self._look()
        return {
            "event": "send_progress",
            "phase": self.status.phase,
            "sent_bytes": self.status.sent_bytes,
            "total_bytes": self.total,
            "precopy_bytes": self.status.precopy_bytes,
            "rate": round(rate),
            "eta_seconds": None if eta is None else round(eta, 1),
            "channels": self.status.channels,
        }


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


async def emit_events(
    done: trio.Event,
    make: Callable[[], dict[str, object]],
    stream: TextIO | None = None,
    every: float = 1.0,
) -> None:
    """Write ``make()`` as one JSON line on ``stream`` (stderr) every ``every`` seconds
    until ``done`` is set, and once more at the end."""
    out = stream or sys.stderr
    while True:
        with trio.move_on_after(every):
            await done.wait()
        out.write(json.dumps(make()) + "\n")
        out.flush()
        if done.is_set():
            return
