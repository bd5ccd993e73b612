"""The source interface: where `vfiomig send` reads one device's state from.

The sender calls ``start()``, then ``read(n)`` until it returns an empty buffer (end of
the data stream), then ``config_blob()`` for the config packet, then ``finish()`` and
finally ``aclose()`` (always, also after a failure).
"""

from __future__ import annotations

import abc

from vfiomig._core._wire import wrap_config


class Source(abc.ABC):
    """One device's state stream on the sending side."""

    description: str = "source"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare to read (a vfio-user source enters STOP_COPY here)."""

    @abc.abstractmethod
    async def read(self, max_bytes: int) -> bytes | bytearray:
        """Return up to ``max_bytes`` of the stream; an empty result means the end."""

    async def config_blob(self) -> bytes:
        """Return the whole config blob, markers included (default: an empty body)."""
        return wrap_config(b"")

    async def finish(self) -> None:  # noqa: B027 - optional hook
        """Called once after the config packet was queued (vfio-user: SET STOP)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release every resource; idempotent."""
