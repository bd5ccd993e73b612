"""The ``vfio-user:SOCKPATH[,config=FILE]`` source: read a device's state from a server.

Sequence: connect, VERSION, GET MIGRATION (STOP_COPY required), SET STOP_COPY (walking
RUNNING -> STOP -> STOP_COPY), MIG_DATA_READs of the server's ``max_data_xfer_size``
with a window of them in flight (the server answers them in order) until the device
returns 0 bytes, then, once the config packet is queued, SET STOP.

With a precopy phase (``vfiomig send --control``) and a device that offers PRE_COPY and
runs: SET PRE_COPY first, and MIG_DATA_READs while it runs until the device returns 0 bytes
(vfio-user has no precopy-info message: each round reads to that temporary end); then SET
STOP_COPY as above. A failed migration sets RUNNING again (`abort`).

With the C send path (`vfiomig.send._threads`) the STOP_COPY data is read by a C reader
thread instead (`native_stream`, see `_native_read`): the same requests, checks and
errors, the replies' data received straight into the chunks the channels send, no
Python per reply. The precopy phase, the pure core and a client that is not idle once
started keep the reads here.

The config blob: the device's PCI config space (region 7, read before STOP_COPY; see
`_config_space`) between QEMU's markers, which a ``vfio-user:`` sink writes back into the
destination device: a standalone migration (no VMM attached: a vfio-user server serves
one client) carries it. ``config=FILE`` replaces it with the blob in ``FILE``, markers
included, as ``vfiomig receive --config-out`` wrote it (say, a VMM's own config state);
a device that is not PCI sends an empty config body.
"""

from __future__ import annotations

import logging
import os
from typing import Final

import trio

from vfiomig._core._errors import ConfigStateError, UsageError, VfioMigError
from vfiomig._core._wire import check_config_blob, wrap_config
from vfiomig._logs import event
from vfiomig.sources import Source
from vfiomig.vfio_user._migration_bodies import MIGRATION_PRE_COPY, MigState
from vfiomig.vfio_user._version import DEFAULT_MAX_DATA_XFER_SIZE
from vfiomig.vfio_user.client._client import DEFAULT_TIMEOUT, VfioUserClient, open_vfio_user_client
from vfiomig.vfio_user.client._config_space import encode as encode_config
from vfiomig.vfio_user.client._config_space import read_config_space
from vfiomig.vfio_user.client._pipeline import VfioUserCommandError
from vfiomig.vfio_user.client._sink import start_migration

_CONFIG_OPTION: Final = ",config="

log = logging.getLogger("vfiomig")


class VfioUserSource(Source):
    """Reads the STOP_COPY stream of a vfio-user device; see the module docstring."""

    fills_reads = True  # `read` joins replies until the bytes asked for or the end

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config_path: str | os.PathLike[str] | None = None,
        reply_timeout: float = DEFAULT_TIMEOUT,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        window: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._window = window
        self.config_path = None if config_path is None else os.fspath(config_path)
        self.description = f"vfio-user:{self.path}"
        self._reply_timeout = reply_timeout
        self._max_data_xfer_size = max_data_xfer_size
        self._client: VfioUserClient | None = None
        self._ended = False
        self._space: bytes | None = None  # PCI config space, read in `start`
        # The C reader's (`native_stream`): None not used, () reading, then its detail.
        self._native: tuple[object, ...] | None = None
        self._native_error: BaseException | None = None

    @property
    def client(self) -> VfioUserClient:
        if self._client is None:
            raise RuntimeError(f"{self.description}: start() was not called")
        return self._client

    async def start(self) -> None:
        """Connect (unless the precopy phase did) and enter STOP_COPY."""
        if self._client is None:
            self._client = await self._connect()
        if self.config_path is None:
            # Before STOP_COPY, where region access is refused; with no VMM attached
            # nothing changes config space after this.
            self._space = await read_config_space(self._client)
        await start_migration(self._client, MigState.STOP_COPY)

    async def _connect(self) -> VfioUserClient:
        return await open_vfio_user_client(
            self.path,
            reply_timeout=self._reply_timeout,
            max_data_xfer_size=self._max_data_xfer_size,
            window=self._window,
        )

    async def start_precopy(self) -> bool:
        """Connect; SET PRE_COPY if the device offers it and is RUNNING."""
        client = self._client = await self._connect()
        if not await client.get_migration_flags() & MIGRATION_PRE_COPY:
            return False
        try:
            if await client.get_state() != MigState.RUNNING:
                return False
        except VfioUserCommandError:
            pass  # a server that cannot say is RUNNING after connect, as QEMU assumes
        await client.set_state(MigState.PRE_COPY)
        return True

    async def precopy_info(self) -> None:
        """vfio-user has no precopy-info message."""
        await trio.lowlevel.checkpoint()

    async def read_precopy(self, max_bytes: int) -> bytes:
        """One MIG_DATA_READ in PRE_COPY; ``b""``: nothing more now."""
        return await self.client.read_data(max_bytes)

    async def abort(self) -> None:
        """SET RUNNING (the migration failed), bounded by the reply timeout; never raises."""
        if self._client is not None and not self._client.broken:
            try:
                await self._client.set_state(MigState.RUNNING)
            except (OSError, VfioMigError, trio.TooSlowError) as exc:
                log.warning(
                    "%s: back to RUNNING failed: %s",
                    self.description,
                    exc,
                    extra=event("source_abort_failed", self.description, reason=str(exc)),
                )

    @property
    def read_natively(self) -> bool:
        """Whether the C send path's reader thread read the STOP_COPY stream (to its end,
        a failure or a cancel): it handed the socket back."""
        return self._native not in (None, ())

    def streams_natively(self) -> bool:
        """The C send path's reader reads the STOP_COPY stream (`_native_read`) when the
        client is idle once started (else the stream is read here and pushed)."""
        return True

    def native_stream(self) -> tuple[object, ...] | None:
        """After `start`, before any read: the client's socket for the C reader, when the
        client is idle (`VfioUserClient.native_read`); the reader hands it back with
        nothing outstanding (`native_joined`)."""
        if self._client is None or self._ended or self._native is not None:
            return None
        stream = self._client.native_read()
        if stream is not None:
            self._native = ()
        return stream

    def native_joined(self, detail: tuple[object, ...] | None) -> None:
        """The C reader is done: the client takes its socket back (broken unless in
        step); its failure, if any, is kept for `native_failed`."""
        if detail is None or self._client is None or self._native != ():
            return
        self._native = detail
        self._native_error = self._client.native_read_ended(detail)
        self._ended = True

    async def native_failed(self, exc: OSError, offset: int) -> BaseException:
        """The C reader's failure, as `read` raises it (the client already collected the
        replies owed after an ERROR reply; it is broken after a protocol violation, a
        timeout or a closed connection)."""
        await trio.lowlevel.checkpoint()
        return exc if self._native_error is None else self._native_error

    async def read(self, max_bytes: int) -> bytes | bytearray | memoryview:
        """Up to ``max_bytes``, in MIG_DATA_READs; ``b""`` once the device returned 0 bytes.

        When one reply holds all of it (``max_bytes`` up to the server's
        ``max_data_xfer_size``, or the stream's last bytes) it is a read-only view of the
        buffer the reply was received in, not a copy; it stays valid as long as it is
        kept (see `_read_pipeline`). Data from several replies is joined into bytes.
        """
        out: list[memoryview] = []
        got = 0
        while not self._ended and got < max_bytes:
            pieces = await self.client.read_stream(max_bytes - got)
            if not pieces:
                self._ended = True
            out += pieces
            got += sum(map(len, pieces))
        return out[0] if len(out) == 1 else b"".join(out)

    async def config_blob(self) -> bytes:
        if self.config_path is None:
            return wrap_config(b"" if self._space is None else encode_config(self._space))
        blob = await trio.Path(self.config_path).read_bytes()
        try:
            check_config_blob(self.description, 0, blob)
        except ConfigStateError as exc:
            raise UsageError(f"config file {self.config_path}: {exc}") from exc
        return blob

    async def finish(self) -> None:
        """SET STOP: the device leaves STOP_COPY."""
        await self.client.set_state(MigState.STOP)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def open_vfio_user_source(arg: str) -> Source:
    """``vfio-user:SOCKPATH[,config=FILE]`` -> a `VfioUserSource`."""
    path, sep, config = arg.rpartition(_CONFIG_OPTION)
    if not sep:
        path, config = arg, ""
    if not path or (sep and not config):
        raise UsageError(f"source vfio-user:{arg} must look like vfio-user:SOCKPATH[,config=FILE]")
    return VfioUserSource(path, config_path=config or None)
