"""A device served from a thread of its own, for programs not written on trio.

``start_vfio_user_thread(path, device)`` runs `serve_vfio_user` in a new thread (its own
trio run) and returns a `VfioUserThread` once the socket listens. The handle's methods
are safe to call from any other thread: each is carried into the server's thread
(``trio.from_thread`` with the run's token) and waits for its result there, so an
emulator written with threads, asyncio or a plain loop raises interrupts, reaches guest
memory and stops the server without touching trio. The device's callbacks (region
access, migration, reset, quiesce) run in the server's thread, one at a time; from inside
them use the device itself (``device.irqs``, ``device.quiesced``), never the handle
(that would wait for the thread it runs in).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from vfiomig.vfio_user.server._device import VfioUserDevice
from vfiomig.vfio_user.server._irqs import IrqIndex
from vfiomig.vfio_user.server._serve import serve_vfio_user

T = TypeVar("T")

#: How long `start_vfio_user_thread` waits for the socket to listen, `stop` for the end.
THREAD_TIMEOUT = 10.0


class VfioUserThread:
    """The handle of a server running in its own thread (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], device: VfioUserDevice) -> None:
        self.path = os.fspath(path)
        self.device = device
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"vfio-user {self.path}", daemon=True
        )

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported by start / stop in the caller's thread
            self._error = exc
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_vfio_user, self.path, self.device)
                self._started.set()

    def _start(self, timeout: float) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"vfio-user {self.path}: the server did not listen in {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"vfio-user {self.path}: the server failed to start") from (
                self._error
            )

    # ------------------------------------------------------------------ from any thread

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in the server's thread and return its result (or raise its
        exception here). RuntimeError when the server is not running."""
        if self._token is None or not self._thread.is_alive():
            raise RuntimeError(f"vfio-user {self.path}: the server is not running")
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise RuntimeError(f"vfio-user {self.path}: the server is not running") from None

    def trigger(self, index: IrqIndex, vector: int = 0) -> bool:
        """`Irqs.trigger` (non-strict): True if delivered or held while masked."""
        return self.call(lambda: self.device.irqs.trigger(index, vector, strict=False))

    def trigger_enabled(self, vector: int = 0) -> IrqIndex | None:
        """`Irqs.trigger_enabled`: ``vector`` of the type the guest enabled."""
        return self.call(self.device.irqs.trigger_enabled, vector)

    def quiesced(self, errno_: int = 0) -> None:
        """`VfioUserDevice.quiesced` from another thread."""
        self.call(self.device.quiesced, errno_)

    def dma_read(self, iova: int, length: int) -> bytes:
        """``length`` bytes of guest memory at ``iova`` (`Dma.read`: DMA_READ messages).

        Raises:
            OSError: as `Dma.translate` / `Dma.read` (ENOENT unmapped, ENOTCONN, ...).
        """

        async def read() -> bytes:
            return await self.device.dma.read(self.device.dma.translate(iova, length))

        return self._run(read)

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to guest memory at ``iova`` (`Dma.write`: DMA_WRITE messages)."""

        async def write() -> None:
            sgs = self.device.dma.translate(iova, len(data), write=True)
            await self.device.dma.write(sgs, data)

        self._run(write)

    def _run(self, afn: Callable[[], Awaitable[T]]) -> T:
        if self._token is None or not self._thread.is_alive():
            raise RuntimeError(f"vfio-user {self.path}: the server is not running")
        try:
            return trio.from_thread.run(afn, trio_token=self._token)
        except trio.RunFinishedError:
            raise RuntimeError(f"vfio-user {self.path}: the server is not running") from None

    def stop(self, timeout: float = THREAD_TIMEOUT) -> None:
        """Stop serving (the client, if any, is dropped as on a disconnect), wait for the
        thread to end and remove the socket file; a no-op when already stopped.

        Raises:
            TimeoutError: the thread did not end within ``timeout`` seconds.
            RuntimeError: the server had failed (its exception is the cause).
        """
        scope, token = self._scope, self._token
        if scope is not None and token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(scope.cancel, trio_token=token)
            except trio.RunFinishedError:
                pass  # it ended on its own
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"vfio-user {self.path}: the server did not stop in {timeout} s")
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"vfio-user {self.path}: the server failed") from error

    def __enter__(self) -> VfioUserThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_vfio_user_thread(
    path: str | os.PathLike[str], device: VfioUserDevice, *, timeout: float = THREAD_TIMEOUT
) -> VfioUserThread:
    """Serve ``device`` on a new UNIX socket at ``path`` from a new thread; returns once
    the socket listens (see the module docstring). Stop it with `VfioUserThread.stop`
    (or use the handle as a context manager).

    Raises:
        TimeoutError: it did not listen within ``timeout`` seconds.
        RuntimeError: the server failed to start (e.g. the path is taken; the cause).
    """
    handle = VfioUserThread(path, device)
    handle._start(timeout)
    return handle
