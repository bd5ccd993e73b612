"""Test fixtures for vfio-user device emulators: serve a device, attach a VMM, poke it.

A pytest plugin (registered as the ``vfiomig_vfio_user`` pytest11 entry point, so any
project that installs vfiomig has it; with pytest-trio). Its fixture ``vfio_user`` is a
`VfioUserHarness` bound to the test's nursery:

```python
async def test_counter(vfio_user):
    counter = Counter()
    client = await vfio_user.attach(counter.device)  # served on a fresh socket
    [irq] = await client.set_irq_eventfds(IrqIndex.MSI)
    await client.region_write(0, 0, (5).to_bytes(4, "little"))
    await irq.wait()  # bounded: fails with a clear error after 5 s
    ram = await client.map_dma(0x10000, 0x1000)  # guest memory, a memfd the device maps
    assert client.guest.read(0x10000, 4) == ...
```

``attach`` also runs the client's `VfioUserClient.serve_requests` in the nursery, so the
device's DMA_READ / DMA_WRITE are answered from ``client.guest`` at any time; ``vfio_user.nursery`` takes the device's own tasks. `migrate`
moves a device's state to another through vfiomig's own ``vfio-user:`` source and sink
(the standalone path of ``vfiomig send`` / ``receive``, PCI config space included). Every
wait is bounded; at the end of the test the clients are closed and the servers stopped.

Outside pytest, `open_harness` gives the same object in an ``async with``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import pytest
import trio

from vfiomig._core._wire import check_config_blob
from vfiomig.vfio_user.client import (
    VfioUserClient,
    VfioUserSink,
    VfioUserSource,
    open_vfio_user_client,
)
from vfiomig.vfio_user.server import VfioUserDevice, serve_vfio_user

__all__ = ["VfioUserHarness", "open_harness", "vfio_user"]

#: The bound on every wait of the harness's clients (connect, each reply).
DEFAULT_TIMEOUT: Final = 10.0


class VfioUserHarness:
    """Serves devices and attaches clients within one nursery; see the module docstring."""

    def __init__(self, nursery: trio.Nursery, directory: str, *, timeout: float) -> None:
        self.nursery = nursery
        self.directory = directory
        self.timeout = timeout
        self._count = 0
        self._clients: list[VfioUserClient] = []
        self._servers: list[trio.CancelScope] = []
        self._paths: dict[int, str] = {}  # id(device) -> socket path

    async def serve(self, device: VfioUserDevice) -> str:
        """Serve ``device`` on a new socket (one client at a time); its path. A device
        served already keeps its socket."""
        known = self._paths.get(id(device))
        if known is not None:
            return known
        self._count += 1
        path = os.path.join(self.directory, f"dev{self._count}.sock")
        scope = trio.CancelScope()

        async def run(
            *, task_status: trio.TaskStatus[VfioUserDevice] = trio.TASK_STATUS_IGNORED
        ) -> None:
            with scope:
                await serve_vfio_user(path, device, task_status=task_status)

        await self.nursery.start(run)
        self._servers.append(scope)
        self._paths[id(device)] = path
        return path

    async def attach(self, device: VfioUserDevice | str) -> VfioUserClient:
        """Serve ``device`` (or take a socket path) and connect a client to it, with its
        DMA request server running; closed at the end of the test (or `detach`)."""
        path = device if isinstance(device, str) else await self.serve(device)
        client = await open_vfio_user_client(path, reply_timeout=self.timeout)
        self._clients.append(client)
        try:
            await self.nursery.start(_serve_requests, client)
        except BaseException:
            await self.detach(client)
            raise
        return client

    async def detach(self, client: VfioUserClient) -> None:
        """Close ``client``: the device's server moves on to its next client."""
        if client in self._clients:
            self._clients.remove(client)
        await client.aclose()

    async def migrate(self, source: VfioUserDevice, dest: VfioUserDevice) -> bytes:
        """Move ``source``'s state into ``dest`` as ``vfiomig send`` / ``receive`` do
        with ``vfio-user:`` devices and no VMM: STOP_COPY read to the end, RESUMING,
        write, the config blob (PCI config space) replayed, STOP. Detach the clients of
        both devices first (a server serves one client at a time). Returns the config
        blob that travelled."""
        src = VfioUserSource(await self.serve(source), reply_timeout=self.timeout)
        dst = VfioUserSink(await self.serve(dest), reply_timeout=self.timeout)
        try:
            with trio.fail_after(self.timeout * 4):
                await src.start()
                await dst.start()
                while data := await src.read(1 << 20):
                    await dst.write([data])
                blob = await src.config_blob()
                check_config_blob("migrate", 0, blob)
                await dst.load_config(blob)
                await dst.finish()
                await src.finish()
        except BaseException:
            with trio.CancelScope(shield=True):
                await src.abort()
                await dst.abort()
            raise
        finally:
            with trio.CancelScope(shield=True):
                await src.aclose()
                await dst.aclose()
        return blob

    async def aclose(self) -> None:
        """Close every client, stop every server."""
        for client in list(self._clients):
            await self.detach(client)
        for scope in self._servers:
            scope.cancel()


async def _serve_requests(
    client: VfioUserClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    try:
        await client.serve_requests(task_status=task_status)
    except Exception:
        if not client.broken:
            raise
        # A broken connection fails the test's own calls with the reason; the
        # background task ends quietly so that the error is reported once.


@asynccontextmanager
async def open_harness(*, reply_timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[VfioUserHarness]:
    """A `VfioUserHarness` with a nursery and a socket directory of its own;
    ``reply_timeout`` bounds each wait of its clients."""
    directory = tempfile.mkdtemp(prefix="vfu", dir="/tmp")  # short: AF_UNIX paths <= 107
    try:
        async with trio.open_nursery() as nursery:
            harness = VfioUserHarness(nursery, directory, timeout=reply_timeout)
            try:
                yield harness
            finally:
                with trio.CancelScope(shield=True):
                    await harness.aclose()
                nursery.cancel_scope.cancel()  # the device tasks the test started too
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def vfio_user() -> AsyncIterator[VfioUserHarness]:
    """A `VfioUserHarness` for the test (see `vfiomig.testing.vfio_user`)."""
    async with open_harness() as harness:
        yield harness
