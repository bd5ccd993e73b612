"""Interrupts as a VMM receives them: one eventfd per vector, wired with SET_IRQS.

An `Interrupt` owns its eventfd (non-blocking, so a read never stalls the event loop);
`wait` parks the task until the device signals it (trio's ``wait_readable``), bounded by a
timeout, and returns how many signals the counter held; `take` reads without waiting.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass

import trio

from vfiomig._core._errors import SinkError

#: How long `Interrupt.wait` waits by default.
DEFAULT_IRQ_TIMEOUT = 5.0
_INDEX_NAMES = ("INTX", "MSI", "MSIX", "ERR", "REQ")


@dataclass(slots=True, eq=False)
class Interrupt:
    """Vector ``vector`` of IRQ index ``index``, signalled through ``fd`` (an eventfd)."""

    index: int
    vector: int
    fd: int
    where: str = "vfio-user"

    @property
    def name(self) -> str:
        index = _INDEX_NAMES[self.index] if self.index < len(_INDEX_NAMES) else self.index
        return f"irq {index} vector {self.vector}"

    def take(self) -> int:
        """The signals received since the last read (0: none); resets the counter."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    async def wait(self, timeout: float = DEFAULT_IRQ_TIMEOUT) -> int:  # noqa: ASYNC109 - bounded by default, on purpose
        """Wait until the device signals this vector; the count of signals taken.

        Raises:
            SinkError: ETIMEDOUT when nothing came within ``timeout`` seconds.

        Cancellation: safe; a signal that arrives later stays in the counter.
        """
        with trio.move_on_after(timeout):
            while True:
                count = self.take()
                if count:
                    return count
                await trio.lowlevel.wait_readable(self.fd)
        raise SinkError(
            f"{self.where}: no interrupt on {self.name} within {timeout:g} s",
            errno=_errno.ETIMEDOUT,
        )

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            trio.lowlevel.notify_closing(fd)  # a task in `wait` gets ClosedResourceError
            os.close(fd)
