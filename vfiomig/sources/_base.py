"""The source interface: where `vfiomig send` reads one device's state from.

The sender calls ``start()``, then ``read(n)`` until it returns an empty buffer (end of the
data stream) - or, for a source that `fills_buffers` (a stream whose packet boundaries are
the sender's to choose: synthetic state, a file, a pipe), ``read_into(buf)`` until it
returns less than the buffer holds - then ``config_blob()`` for the config packet, then
``finish()`` and finally ``aclose()`` (always, also after a failure). When the migration
failed, here or at the receiver, ``abort()`` comes before ``aclose()``. With the C send path
a source that `native_stream` describes is read by C threads between ``start()`` and
``config_blob()`` instead of ``read``/``read_into``.

A source whose device keeps running while part of its state is sent ahead (a kernel VFIO
device in PRE_COPY) has a precopy phase before ``start()``: ``start_precopy()`` returns
True, then rounds of ``precopy_info()`` and ``read_precopy(n)`` follow (the sender sends
those bytes as ``precopy`` messages on the control channel, see `vfiomig.send`), and
``start()`` then switches the device over. Every other source has no precopy phase.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import trio

from vfiomig._core._wire import wrap_config


class PrecopyInfo(NamedTuple):
    """What a device in its precopy phase says it could give now (VFIO_MIG_GET_PRECOPY_INFO)."""

    initial_bytes: int
    dirty_bytes: int

    @property
    def pending(self) -> int:
        return self.initial_bytes + self.dirty_bytes


class Source(abc.ABC):
    """One device's state stream on the sending side."""

    description: str = "source"
    #: Whether `read_into` fills the sender's buffers: the stream is cut into packets of
    #: the packet size wherever the sender likes. False: each `read` is one packet (a
    #: device's reads, as QEMU sends them).
    fills_buffers: bool = False
    #: Whether `read` returns as many bytes as it is asked for until the stream's last
    #: ones (a device's reads, filled across short reads): the C send path then reads a
    #: chunk of whole packets at a time and cuts it, the packets of a read per packet.
    fills_reads: bool = False

    async def start_precopy(self) -> bool:
        """Enter the precopy phase if the device offers one; False (the default): none."""
        return False

    async def precopy_info(self) -> PrecopyInfo | None:
        """In the precopy phase: the bytes the device reports pending; None when the
        device has no way to say (a round then reads to the temporary end)."""
        raise NotImplementedError(f"{self.description} has no precopy phase")

    async def read_precopy(self, max_bytes: int) -> bytes:
        """In the precopy phase: up to ``max_bytes``; empty when nothing is readable now."""
        raise NotImplementedError(f"{self.description} has no precopy phase")

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare to read (a vfio-user source enters STOP_COPY here)."""

    @abc.abstractmethod
    async def read(self, max_bytes: int) -> bytes | bytearray | memoryview:
        """Return up to ``max_bytes`` of the stream; an empty result means the end. A
        memoryview must stay valid (and unchanged) for as long as the caller keeps it."""

    async def read_into(self, buf: memoryview) -> int:
        """With `fills_buffers`: fill ``buf`` with the next bytes of the stream and return
        how many; fewer than ``len(buf)`` only at the end of the stream (0: nothing left)."""
        raise NotImplementedError(f"{self.description} does not fill buffers")

    def native_stream(self) -> tuple[object, ...] | None:
        """How the C send path (`vfiomig._core.SendJob`) reads this stream itself, asked
        after `start` (a VFIO device's data fd exists only then), before any read:
        ``("synth", size, seed, base)``, ``("pattern", size, block)``, ``("fd", fd, poll)``
        or ``("vfio-user", fd, size, window, timeout_ms)`` (see `vfiomig._native.SendJob`);
        None (the default): it cannot. A source that says how promises that `config_blob`
        and `finish` do not depend on the reading (the sender calls them around the C
        threads' reads).

        A source that cannot is still sent by the C path when it does not
        `fills_buffers` (a device's reads, each a packet): the sender reads it with `read`
        and pushes each packet's data to the C threads (`vfiomig.send._threads`)."""
        return None

    def streams_natively(self) -> bool:
        """Whether `native_stream` will say how once the source is started: asked before
        `start`, to choose the sender. The default asks `native_stream` now (a stream
        that exists before `start`: a file, a pipe, synthetic state)."""
        return self.native_stream() is not None

    async def native_failed(self, exc: OSError, offset: int) -> BaseException:
        """The C send path's read of `native_stream` failed with ``exc`` after ``offset``
        bytes: the error to report (its text is the cause in the device's one line). A
        device source puts its device back as its own `read` would have on that failure
        (`abort` still follows). The default: ``exc``."""
        await trio.lowlevel.checkpoint()
        return exc

    def native_joined(self, detail: tuple[object, ...] | None) -> None:  # noqa: B027 - hook
        """The C send path's threads are joined (success, failure or cancel alike):
        ``detail`` says how its reader's reads of `native_stream` ended
        (`vfiomig._native.SendJob.source_detail`: a vfio-user device's, None for the
        other kinds). A source whose stream was a connection it shares takes it back here
        (a vfio-user client). The default: nothing."""

    def size_hint(self) -> int | None:
        """The bytes the stream still holds, when that is known before reading them (a
        progress line's time left); None (the default) when it is not."""
        return None

    async def config_blob(self) -> bytes:
        """Return the whole config blob, markers included (default: an empty body)."""
        return wrap_config(b"")

    async def finish(self) -> None:  # noqa: B027 - optional hook
        """Called once after the config packet was queued (vfio-user: SET STOP)."""

    async def abort(self) -> None:  # noqa: B027 - optional hook
        """The migration failed: give the device back to its owner running (a VFIO device
        returns to RUNNING). Never raises; bounded in time."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release every resource; idempotent."""
