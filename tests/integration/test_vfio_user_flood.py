"""Strangers on a vfio-user server built on the library (`serve_vfio_user`): it serves one
client at a time, and every other connection must be refused at once (closed), not
queued in the listen backlog where it waits forever and holds the peer's fd. See
RELIABILITY.md §6."""

from __future__ import annotations

import os
import socket
import tempfile

import trio
import trio.testing

from tests.integration.faults import open_fds
from vfiomig.vfio_user import (
    BarDevice,
    MigState,
    VfioUserDevice,
    open_vfio_user_client,
    serve_vfio_user,
)

STRANGERS = 200


async def _refused_at_once(path: str, within: float) -> str:
    """Connect and wait up to ``within`` seconds for the server to close the connection:
    "refused", "queued" (still open), or "no connect" (the kernel's backlog was full)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            await sock.connect(path)
        except OSError:
            return "no connect"
        with trio.move_on_after(within):
            try:
                if await sock.recv(4096) == b"":
                    return "refused"
            except (ConnectionResetError, BrokenPipeError):
                return "refused"
            except OSError as exc:  # e.g. EINVAL: dropped from a backlog, never accepted
                return f"errno {exc.errno}"
    return "queued"


async def test_extra_clients_are_refused_at_once_while_one_is_served() -> None:
    device = VfioUserDevice(BarDevice((0x100,)))
    with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
        path = os.path.join(tmp, "s")
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_vfio_user, path, device)
                before = len(open_fds())
                # A stranger takes the one place and says nothing.
                with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
                    await holder.connect(path)
                    outcomes: dict[str, int] = {}
                    limit = trio.CapacityLimiter(8)  # no more at once than the backlog holds

                    async def stranger() -> None:
                        async with limit:
                            outcome = await _refused_at_once(path, 2.0)
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1

                    async with trio.open_nursery() as flood:
                        for _ in range(STRANGERS):
                            flood.start_soon(stranger)
                    assert outcomes == {"refused": STRANGERS}, outcomes
                # The holder has gone: a client that connects at once is served (the server
                # sees the holder hung up and hands its place over).
                async with await open_vfio_user_client(path, reply_timeout=5) as client:
                    assert await client.get_state() == MigState.RUNNING
                await trio.testing.wait_all_tasks_blocked()  # the server closed its side of it
                after = len(open_fds())
                nursery.cancel_scope.cancel()
    assert after == before
