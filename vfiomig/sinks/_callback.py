"""Library sinks and config targets backed by plain callables."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import trio

from vfiomig.sinks._base import Chunk, ConfigCallback, ConfigTarget, Sink, WriteCallback


class CallbackSink(Sink):
    """Calls ``write(chunk)`` for each chunk, in order; sync or async callables.

    The chunk is a memoryview that is valid only during the call: copy what you keep.
    """

    def __init__(
        self,
        write: WriteCallback,
        *,
        description: str = "callback",
    ) -> None:
        self._write = write
        self._is_async = inspect.iscoroutinefunction(write)
        self.description = description
        self.bytes_written = 0

    async def write(self, chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:
            view = memoryview(chunk)
            result = self._write(view)
            if inspect.isawaitable(result):
                await result
            self.bytes_written += len(view)
        if not self._is_async:
            await trio.lowlevel.checkpoint()


class CallbackConfig(ConfigTarget):
    """Hands the config blob to ``load(data)`` (sync or async)."""

    def __init__(self, load: ConfigCallback, *, description: str = "config callback") -> None:
        self._load = load
        self.description = description

    async def load_config(self, data: bytes) -> None:
        result = self._load(data)
        if inspect.isawaitable(result):
            await result
