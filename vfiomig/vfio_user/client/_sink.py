"""The ``vfio-user:SOCKPATH`` sink: load a device's state into a vfio-user server.

Sequence (SPEC.md §4, the reference's §3.7): connect, VERSION, DEVICE_FEATURE GET
MIGRATION (STOP_COPY required), SET RESUMING (walking RUNNING -> STOP -> RESUMING),
MIG_DATA_WRITE in messages no larger than both sides' ``max_data_xfer_size`` nor
``max-write``, pipelined (a window of writes in flight, see `_pipeline`), SET STOP to
finish (where the device validates the stream; an ERROR reply fails the device with its
errno). ``abort`` resets the device, best effort. In the finish step, before SET STOP,
`VfioUserSink.load_config` writes the PCI config space a ``vfio-user:`` source put in
the config blob back into the device (`_config_space`: BARs and capability addresses
before enable bits, the command register last); a blob without it (a VMM's, or an empty
one) is left to the config target: with a VMM attached, the VMM owns config space.

A refused write fails the device with that write's errno and the idx its data came
from; writes already in flight behind it may have reached the device, which is why the
sink never moves a device out of RESUMING after a failure: ``abort`` resets it
(DEVICE_RESET), so no partly loaded device runs.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
from collections.abc import Sequence
from typing import Final

import trio

from vfiomig._core._errors import SinkError, UsageError
from vfiomig._core._wire import CONFIG_MARKER_SIZE
from vfiomig._logs import event
from vfiomig._units import parse_size
from vfiomig.sinks import Chunk, Sink
from vfiomig.vfio_user._migration_bodies import MIGRATION_STOP_COPY, MigState
from vfiomig.vfio_user._version import DEFAULT_MAX_DATA_XFER_SIZE
from vfiomig.vfio_user.client._client import DEFAULT_TIMEOUT, VfioUserClient, open_vfio_user_client
from vfiomig.vfio_user.client._config_space import decode as decode_config
from vfiomig.vfio_user.client._config_space import replay_config_space
from vfiomig.vfio_user.client._pipeline import VfioUserCommandError

log = logging.getLogger("vfiomig.vfio_user")

#: How long ``abort`` tries to reset the device before giving up.
ABORT_TIMEOUT: Final = 5.0

#: The largest MIG_DATA_WRITE data the sink sends in one message by default, whatever the
#: server's ``max_data_xfer_size`` allows. libvfio-user receives a message body with one
#: ``recv()`` without MSG_WAITALL (``tran_sock_recv_body``) and takes a short read as an
#: error, and a UNIX stream socket queues a ``sendmsg`` in pieces (skbs) of at most
#: about 36 KiB (32 KiB of page fragments plus the head), so only a message that fits one
#: piece is sure to be there whole when the server reads it; each write goes out in its
#: own ``sendmsg``. 1 MiB and 64 KiB writes broke libvfio-user's framing, 32 KiB ones
#: never did. ``max-write=SIZE`` raises it for servers that read whole messages
#: (vfiomig's own does).
DEFAULT_MAX_WRITE: Final = 32 * 1024


async def start_migration(client: VfioUserClient, target: MigState) -> None:
    """Check that the device migrates (STOP_COPY), then move it to ``target``."""
    flags = await client.get_migration_flags()
    if not flags & MIGRATION_STOP_COPY:
        raise SinkError(
            f"vfio-user {client.path}: migration flags {flags:#x} lack stop-copy "
            f"({MIGRATION_STOP_COPY:#x})",
            errno=_errno.ENOTSUP,
        )
    await client.set_state(target)


class VfioUserSink(Sink):
    """Writes the stream to a vfio-user device in RESUMING; see the module docstring.

    Args:
        path: the server's UNIX socket.
        reply_timeout: bound on each connect, send and reply wait.
        max_data_xfer_size: advertised to the server (the most it may send us).
        max_write: the largest MIG_DATA_WRITE data per message (see `DEFAULT_MAX_WRITE`);
            writes are also bounded by the server's ``max_data_xfer_size``.
        window: MIG_DATA_WRITEs in flight at once (default: 4 MiB worth, 2..64;
            1 = wait for each reply in turn).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reply_timeout: float = DEFAULT_TIMEOUT,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        max_write: int = DEFAULT_MAX_WRITE,
        window: int | None = None,
    ) -> None:
        if max_write < 1:
            raise ValueError(f"max_write {max_write} is below 1")
        self.path = os.fspath(path)
        self.max_write = max_write
        self.description = f"vfio-user:{self.path}"
        self._reply_timeout = reply_timeout
        self._max_data_xfer_size = max_data_xfer_size
        self._window = window
        self._client: VfioUserClient | None = None
        self._moved = False  # start() may have changed the device's state
        self._batch: tuple[int, int] | None = None
        self.bytes_written = 0  # handed to the client (sent or about to be)

    @property
    def client(self) -> VfioUserClient:
        if self._client is None:
            raise RuntimeError(f"{self.description}: start() was not called")
        return self._client

    async def _connect(self) -> VfioUserClient:
        return await open_vfio_user_client(
            self.path,
            reply_timeout=self._reply_timeout,
            max_data_xfer_size=self._max_data_xfer_size,
            window=self._window,
        )

    async def start(self) -> None:
        """Connect and enter RESUMING."""
        self._client = await self._connect()
        self._moved = True
        await start_migration(self._client, MigState.RESUMING)

    def note_batch(self, first_idx: int, end_idx: int) -> None:
        self._batch = (first_idx, end_idx)

    async def write(self, chunks: Sequence[Chunk]) -> None:
        """Send every byte; writes still in flight are confirmed by a later call or
        `finish`, and a refusal raises there, naming the idx of the refused data."""
        await self.client.write_data(chunks, limit=self.max_write, tag=self._batch)
        self.bytes_written += sum(map(len, chunks))

    async def load_config(self, blob: bytes) -> str | None:
        """Write the PCI config space carried in ``blob`` into the device (RESUMING);
        what was written, or None for a blob that carries none."""
        space = decode_config(self.description, blob[CONFIG_MARKER_SIZE:-CONFIG_MARKER_SIZE])
        if space is None:
            await trio.lowlevel.checkpoint()
            return None
        await self.client.flush()
        count = await replay_config_space(self.client, space)
        log.info(
            "%s: pci config space replayed (%d registers, command %#06x)",
            self.description,
            count,
            int.from_bytes(space[4:6], "little"),
            extra=event("vfio_user_config_replayed", sink=self.description, registers=count),
        )
        return f"pci config space ({count} registers)"

    async def finish(self) -> None:
        """Wait for every write's reply, then SET STOP: the device validates the stream."""
        await self.client.flush()
        try:
            await self.client.set_state(MigState.STOP)
        except VfioUserCommandError as exc:
            # The emulator refused the state it was given; its own text is in its log.
            raise VfioUserCommandError(
                f"{exc.message}: the device refused the loaded state (its emulator's log says why)",
                command=exc.command,
                errno=exc.errno,
                idx=exc.idx,
            ) from exc

    async def abort(self) -> None:
        """Reset a device left in RESUMING (or a state it cannot report), best effort, on
        a fresh connection if ours is unusable.

        A device `start` never moved is not touched. One found in RUNNING or STOP holds no
        partial stream (the failure came before RESUMING, or after SET STOP was taken) and
        is left as it is: DEVICE_RESET is not even allowed in STOP (libvfio-user's rule).
        """
        if not self._moved:
            return
        with trio.move_on_after(ABORT_TIMEOUT):
            try:
                try:
                    await self._reset_if_resuming(fresh=False)
                except Exception:  # e.g. the server's framing broke: a new connection
                    await self._reset_if_resuming(fresh=True)
            except Exception as exc:  # abort must not raise: the device already failed
                log.warning(
                    "%s: device reset after a failure did not work: %s",
                    self.description,
                    exc,
                    extra=event("vfio_user_reset_failed", sink=self.description),
                )

    async def _reset_if_resuming(self, *, fresh: bool) -> None:
        client = self._client
        if fresh or client is None or client.broken:
            if client is not None:
                await client.aclose()
            self._client = None
            client = self._client = await self._connect()
        await client.flush(raise_errors=False)  # already reported by write/finish
        try:
            state: MigState | None = await client.get_state()
        except VfioUserCommandError:
            state = None
        if state in (MigState.RUNNING, MigState.STOP):
            log.info(
                "%s: device in %s after the failure: left as it is",
                self.description,
                state.name,
                extra=event("vfio_user_left_alone", sink=self.description, state=state.name),
            )
            return
        await client.reset()

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


_MAX_WRITE_OPTION: Final = ",max-write="


def open_vfio_user_sink(arg: str) -> Sink:
    """``vfio-user:SOCKPATH[,max-write=SIZE]`` -> a `VfioUserSink`."""
    path, sep, size = arg.rpartition(_MAX_WRITE_OPTION)
    if not sep:
        path, size = arg, ""
    if not path:
        raise UsageError(
            "sink vfio-user: needs a socket path (vfio-user:SOCKPATH[,max-write=SIZE])"
        )
    if not sep:
        return VfioUserSink(path)
    try:
        max_write = parse_size(size)
    except UsageError:
        max_write = 0
    if max_write < 1:
        raise UsageError(f"sink vfio-user:{arg}: max-write must be a positive size, not {size!r}")
    return VfioUserSink(path, max_write=max_write)
