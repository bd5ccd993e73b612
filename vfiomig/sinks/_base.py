"""The sink and config-target interfaces: where one device's reassembled state goes.

A device's loader task (see ``vfiomig.receive._loader``) makes every call to its sink but
one kind: for a sink with ``writes_nowait``, channel tasks also write batches through
``write_nowait`` while the loader is parked (below). The calls come in this order and
never concurrently:

1. ``start()`` once, before the first byte (a VFIO sink enters RESUMING here);
2. ``write(chunks)`` any number of times with the stream in order (precopy bytes first,
   then multifd data in idx order); each call must consume every byte, looping on short
   writes, before it returns. A sink with ``writes_nowait`` also gets batches through
   ``write_nowait(chunks)``, synchronously, from the channel task that completed them
   while the loader is parked with nothing to write; the order is the same single
   sequence, and no two calls ever overlap;
3. ``finish()`` once, after the config blob went to the config target (a VFIO sink leaves
   RESUMING here, which is where the driver validates the stream);
4. ``abort()`` instead of ``finish()`` when the device failed (a VFIO sink resets the
   device); it must not raise;
5. ``aclose()`` always, last; it releases every fd the sink holds and is idempotent.

Errors: raise `SinkError` (or let an ``OSError`` escape); the loader adds the device and
the idx being written to the message, and keeps the ``OSError`` as ``__cause__``.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

import trio

#: What a sink's ``write`` receives: bytes-like objects (bytes, bytearray, memoryview).
Chunk: TypeAlias = "bytes | bytearray | memoryview"


class Sink(abc.ABC):
    """One device's destination for its in-order state stream."""

    #: A short description for messages, e.g. ``"file:/tmp/x"``.
    description: str = "sink"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare to receive the stream (default: nothing).

        Cancellation: may be cancelled; ``aclose`` still runs afterwards.
        """

    @abc.abstractmethod
    async def write(self, chunks: Sequence[Chunk]) -> None:
        """Write every byte of ``chunks``, in order, before returning.

        ``chunks`` is a sequence: a list, or with the C core a `vfiomig._native.Run` whose
        chunks are built when indexed or iterated. Read it during the call only; a chunk
        taken from it stays valid as long as the sink keeps it.

        Cancellation: a cancel may leave a prefix of ``chunks`` written; the loader then
        fails the device, so a partial write is never reported as success.
        """

    #: True when `write_nowait` can take batches: the receiver then writes them from the
    #: channel task that completed them, while the loader is parked with nothing to write,
    #: instead of waking the loader for each batch (a task switch per packet at 1 MiB).
    writes_nowait: bool = False

    def write_nowait(self, chunks: Sequence[Chunk]) -> bool:
        """Write ``chunks`` now, without blocking and without awaiting; only called while
        `writes_nowait` is true, after ``start`` and never during another call.

        Returns True once every byte is written. False when a write would block: a `Run`
        has then advanced its cursor past what went out, and the loader passes the same
        batch to `write`, which goes on from there (a sink that cannot resume a batch
        returns False before writing anything). Errors as for `write`.
        """
        return False

    def note_batch(self, first_idx: int, end_idx: int) -> None:  # noqa: B027 - optional hook
        """Called before each ``write``: its chunks carry data of idx ``first_idx ..
        end_idx - 1`` (``first_idx == end_idx`` for precopy data). A sink that confirms
        writes after ``write`` returned names a late refusal by it in `SinkError.idx`,
        which the loader keeps (default: nothing)."""

    async def load_config(self, blob: bytes) -> str | None:
        """Replay into the device what it takes itself of its config blob (markers
        included), in the finish step after the config target got the blob and before
        `finish`; returns what reached the device, for the log, or None when nothing did
        (default: the blob is the config target's alone). A ``vfio-user:`` sink writes
        the PCI config space a ``vfio-user:`` source carried back into the device."""
        await trio.lowlevel.checkpoint()
        return None

    async def finish(self) -> None:  # noqa: B027 - optional hook
        """Complete the stream after the config blob was loaded (default: nothing)."""

    async def abort(self) -> None:  # noqa: B027 - optional hook
        """Undo what can be undone after a failure (default: nothing). Must not raise."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release every resource; idempotent (default: nothing)."""


class ConfigTarget(abc.ABC):
    """Where a device's config-state blob is replayed in the finish step."""

    description: str = "config target"

    @abc.abstractmethod
    async def load_config(self, data: bytes) -> None:
        """Load the whole config blob (markers included); raise `SinkError` on failure."""


WriteCallback: TypeAlias = Callable[[memoryview], "Awaitable[None] | None"]
ConfigCallback: TypeAlias = Callable[[bytes], "Awaitable[None] | None"]
