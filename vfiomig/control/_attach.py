"""``attach:``: a sink whose fd arrives later, over the control channel (``attach-fd``).

The command line names the device (``--device 0000:00:04.0/vfio=attach:``); the control
peer (a VMM) then sends ``attach-fd`` with one fd as SCM_RIGHTS, and its ``kind`` picks
the real sink: ``vfio-device`` gives a `VfioSink` on the device fd (GET MIGRATION, SET
RESUMING, ..., SET STOP), ``data`` gives a `DataFdSink` on a data fd the VMM already put
in RESUMING. `start` waits for the fd, bounded by ``timeout`` and cancellable.

Fd ownership: from `attach` on, the fd is this sink's; `aclose` closes it whether or not
the sink was ever started.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

from vfiomig._core._errors import SinkError, UsageError
from vfiomig.sinks import Chunk, Sink
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._sink import DataFdSink, VfioSink, WriteFn
from vfiomig.vfio._uapi import IoctlFn

#: Default bound on the wait for ``attach-fd`` once the loader starts the sink.
DEFAULT_ATTACH_TIMEOUT = 60.0


class AttachSink(Sink):
    """A placeholder until ``attach-fd`` hands over the fd; then the real sink.

    Args:
        timeout: seconds `start` waits for the fd before failing the device.
        ioctl, write: passed to the VFIO sink (the fake device model plugs in here).
    """

    description = "attach:"

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_ATTACH_TIMEOUT,
        ioctl: IoctlFn = uapi.sys_ioctl,
        write: WriteFn = os.write,
    ) -> None:
        self.timeout = timeout
        self._ioctl = ioctl
        self._write = write
        self._inner: Sink | None = None
        self._attached = trio.Event()
        self._closed = False

    @property
    def attached(self) -> bool:
        return self._inner is not None

    def attach(self, fd: int, kind: str) -> None:
        """Take ownership of ``fd`` (kind ``data`` or ``vfio-device``).

        Raises:
            SinkError: an fd was already attached or the sink is closed (``fd`` is then
                not taken: the caller still owns it).
        """
        if self._closed:
            raise SinkError(f"{self.description} sink is closed, fd not taken")
        if self._inner is not None:
            raise SinkError(f"{self.description} already has an fd ({self._inner.description})")
        if kind == "vfio-device":
            self._inner = VfioSink.from_device_fd(
                fd, owned=True, ioctl=self._ioctl, write=self._write
            )
        elif kind == "data":
            self._inner = DataFdSink(fd, owned=True, write=self._write)
        else:
            raise SinkError(f"{self.description} fd kind {kind!r} is unknown")
        self.description = f"attach:{self._inner.description}"
        self._attached.set()

    async def start(self) -> None:
        """Wait for ``attach-fd`` (at most ``timeout`` s), then start the real sink.

        Cancellation: the wait is cancellable; `aclose` still releases the fd.
        """
        with trio.move_on_after(self.timeout):
            await self._attached.wait()
        if self._inner is None:
            raise SinkError(f"no attach-fd within {self.timeout:g} s")
        await self._inner.start()

    async def write(self, chunks: Sequence[Chunk]) -> None:
        if self._inner is None:
            raise SinkError("write before attach-fd")
        await self._inner.write(chunks)

    async def finish(self) -> None:
        if self._inner is None:
            raise SinkError("finish before attach-fd")
        await self._inner.finish()

    async def abort(self) -> None:
        if self._inner is not None:
            await self._inner.abort()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        self._closed = True
        if self._inner is not None:
            await self._inner.aclose()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()


def open_attach_sink(arg: str) -> AttachSink:
    """``attach:`` or ``attach:SECONDS`` (how long to wait for the fd, default 60)."""
    if not arg:
        return AttachSink()
    try:
        timeout = float(arg)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise UsageError(f"sink 'attach:{arg}' needs a positive timeout in seconds")
    return AttachSink(timeout=timeout)
