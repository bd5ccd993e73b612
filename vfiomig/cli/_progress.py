"""A progress line on stderr, redrawn in place, only on a terminal.

Redirected to a file or a pipe, stderr gets no progress at all (logs stay one line each);
nor does it with ``-v`` or ``--log-format json``, whose lines a redrawn bar would tear.
"""

from __future__ import annotations

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


def send_status(status: SendStatus) -> str:
    """``stop-copy: 12.0 MiB sent (3.0 MiB precopy), 4 channels open``."""
    precopy = f" ({status.precopy_bytes / 2**20:.1f} MiB precopy)" if status.precopy_bytes else ""
    return (
        f"  {status.phase}: {status.sent_bytes / 2**20:8.1f} MiB sent{precopy},"
        f" {status.channels} channels open"
    )
