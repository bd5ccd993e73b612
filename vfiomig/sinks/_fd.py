"""Sinks on file descriptors: ``file:PATH``, ``fd:N``, ``null:``; config files.

`FdSink` writes with ``writev`` and loops on short writes. A non-blocking fd (a pipe or a
socket set O_NONBLOCK by its owner) is written from the event loop, waiting for
writability on EAGAIN. A blocking pipe is written by the C core's `PipeWriter` thread
(the event loop keeps receiving meanwhile and waits for the batch on an eventfd), or from
the event loop when the C core is not in use; any other fd is written from a worker thread
so that a full pipe or slow disk never stalls the channel readers. EPIPE and every other
``OSError`` propagate; the loader turns them into a `SinkError` naming the device and idx.
"""

from __future__ import annotations

import fcntl
import os
import select
import stat
import struct
import termios
from collections.abc import Sequence

import trio

# PipeWriter and Run are None with the pure-Python core: it writes pipes from the event
# loop, and its batches are lists.
from vfiomig._core import PipeWriter, Run
from vfiomig._core._errors import SinkError, UsageError
from vfiomig.sinks._base import Chunk, ConfigTarget, Sink

_IOV_MAX = 1024


def write_all(fd: int, chunks: Sequence[Chunk]) -> int:
    """Write every chunk to a blocking ``fd`` with ``writev``, looping on short writes."""
    if type(chunks) is Run:  # from its pinned packets, without a view per packet
        total = 0
        while chunks.remaining:
            total += chunks.write_to(fd)
        return total
    views = [memoryview(c).cast("B") for c in chunks if len(c)]
    total = 0
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        total += n
        views = _drop(views, n)
    return total


def _drop(views: list[memoryview], n: int) -> list[memoryview]:
    """Remove the first ``n`` bytes from a list of views (after a short write)."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


_PAGE = 4096
_MIN_LOOP_WRITE = 64 * 1024


def _pipe_size(fd: int) -> int:
    """The capacity of a pipe ``fd``, or 0 when ``fd`` is not a pipe."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return 0
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    except OSError:
        return 0


def _pipe_room(fd: int, size: int) -> int:
    """Bytes a write to the pipe can take without blocking, counted conservatively.

    The pipe holds whole pages: every page in it but the first (partly read) and the last
    (partly written) is full, so the unread bytes occupy at most ceil(unread / page) + 1.
    """
    unread = int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    return size - _PAGE * (-(-unread // _PAGE) + 2)


def _head(views: list[memoryview], limit: int) -> list[memoryview]:
    """The first ``limit`` bytes of ``views``."""
    out: list[memoryview] = []
    for v in views:
        if limit <= 0:
            break
        out.append(v if len(v) <= limit else v[:limit])
        limit -= len(v)
    return out


class FdSink(Sink):
    """Writes the stream to a file descriptor.

    Args:
        fd: the descriptor; a pipe, socket, regular file or character device.
        owned: close ``fd`` in `aclose` (True when the sink opened it).
        description: how messages name this sink.
    """

    def __init__(self, fd: int, *, owned: bool, description: str | None = None) -> None:
        self.fd = fd
        self.owned = owned
        self.description = description or f"fd:{fd}"
        self.bytes_written = 0
        self._nonblocking = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
        self._pipe_size = 0 if self._nonblocking else _pipe_size(fd)
        self._writer: PipeWriter | None = None
        self._closed = False
        # A non-blocking fd (a socket, a pipe the caller made non-blocking) is written by
        # the C core's runs, which keep a cursor; the pure core's lists go through write().
        self.writes_nowait = self._nonblocking and Run is not None

    def write_nowait(self, chunks: Sequence[Chunk]) -> bool:
        return type(chunks) is Run and self._write_run(chunks)

    def _write_run(self, run: Run) -> bool:
        """Write a run from its cursor to the non-blocking fd; False when the fd is full."""
        while run.remaining:
            try:
                self.bytes_written += run.write_to(self.fd)
            except BlockingIOError:
                return False
        return True

    async def write(self, chunks: Sequence[Chunk]) -> None:
        """Write all of ``chunks``.

        Cancellation: a pipe or non-blocking fd stops between writes; a regular file is
        written in a worker thread that is not abandoned, so a cancel waits for it.
        """
        if self._nonblocking and type(chunks) is Run:
            while not self._write_run(chunks):  # goes on from the run's cursor
                await trio.lowlevel.wait_writable(self.fd)
            await trio.lowlevel.checkpoint()
        elif self._nonblocking:
            views = [memoryview(c).cast("B") for c in chunks if len(c)]
            while views:
                try:
                    n = os.writev(self.fd, views[:_IOV_MAX])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.fd)
                    continue
                self.bytes_written += n
                views = _drop(views, n)
            await trio.lowlevel.checkpoint()
        elif self._pipe_size and PipeWriter is not None:
            await self._write_in_thread(chunks)
        elif self._pipe_size:
            await self._write_blocking_pipe(chunks)
        else:
            self.bytes_written += await trio.to_thread.run_sync(write_all, self.fd, chunks)

    async def _write_in_thread(self, chunks: Sequence[Chunk]) -> None:
        # The writer thread pins the chunks and writes them while the event loop receives;
        # it never blocks in a write (it writes what the pipe has room for and polls), so
        # stopping it on cancel is prompt, and the fd is closed only after it stopped.
        writer = self._writer
        if writer is None:
            writer = self._writer = PipeWriter(self.fd)
        writer.submit(chunks)
        try:
            while True:
                await trio.lowlevel.wait_readable(writer.done_fd)
                n = writer.result()  # raises the write's OSError (EPIPE, EIO) with errno
                if n is not None:
                    break
        except BaseException:
            self._writer = None
            writer.close()  # stops and joins the thread: nothing writes the fd after this
            raise
        self.bytes_written += n

    async def _write_blocking_pipe(self, chunks: Sequence[Chunk]) -> None:
        # A blocking pipe (fd:N inherited from a back-end) is written from the event loop as
        # long as the pipe has room for the whole writev, so that a write cannot block: a
        # worker thread per write costs ~200 us here, more than writing 1 MiB. Only when
        # the reader lags does it wait for writability. The fd's flags, which
        # the other holders of the pipe share, are left alone.
        views = [memoryview(c).cast("B") for c in chunks if len(c)]
        while views:
            room = _pipe_room(self.fd, self._pipe_size)
            if room < _MIN_LOOP_WRITE:
                # Wait on the event loop, never in a thread: the wait stays cancellable, so
                # a reader that stopped reading cannot hang the loader past its timeout.
                await trio.lowlevel.wait_writable(self.fd)
                # Writable means a free pipe buffer, so a write of up to PIPE_BUF bytes
                # goes through without blocking even when the estimate says no room.
                room = max(_pipe_room(self.fd, self._pipe_size), select.PIPE_BUF)
            n = os.writev(self.fd, _head(views[:_IOV_MAX], room))
            self.bytes_written += n
            views = _drop(views, n)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._writer is not None:
                self._writer.close()  # joins the thread before the fd can be closed
                self._writer = None
            if self.owned:
                os.close(self.fd)


class NullSink(Sink):
    """Discards the stream, counting its bytes (``null:``)."""

    description = "null:"

    writes_nowait = True

    def __init__(self) -> None:
        self.bytes_written = 0

    def write_nowait(self, chunks: Sequence[Chunk]) -> bool:
        self.bytes_written += chunks.nbytes if type(chunks) is Run else sum(map(len, chunks))
        return True

    async def write(self, chunks: Sequence[Chunk]) -> None:
        self.write_nowait(chunks)
        await trio.lowlevel.checkpoint()


def open_file_sink(path: str) -> FdSink:
    """``file:PATH``: create or truncate PATH (a FIFO is opened for writing as it is)."""
    if not path:
        raise UsageError("sink file: needs a path")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SinkError(f"cannot open sink file {path!r}: {exc.strerror}", errno=exc.errno) from exc
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, 0)
    return FdSink(fd, owned=True, description=f"file:{path}")


def open_fd_sink(arg: str) -> FdSink:
    """``fd:N``: an inherited descriptor, e.g. a pipe to a vhost-user back-end's state fd."""
    try:
        fd = int(arg)
        os.fstat(fd)
    except ValueError:
        raise UsageError(f"sink fd:{arg} needs a descriptor number") from None
    except OSError as exc:
        raise UsageError(f"sink fd:{arg} is not an open descriptor ({exc.strerror})") from exc
    return FdSink(fd, owned=True, description=f"fd:{fd}")


def open_null_sink(arg: str) -> NullSink:
    """``null:``: discard the stream."""
    if arg:
        raise UsageError(f"sink null: takes no argument (got {arg!r})")
    return NullSink()


def config_file_name(idstr: str, instance: int) -> str:
    """The config file's name under ``--config-out``: ``<idstr with / as _>.<instance>.config``."""
    return f"{idstr.replace('/', '_')}.{instance}.config"


class ConfigDir(ConfigTarget):
    """Writes the config blob to ``DIR/<idstr with / as _>.<instance>.config``.

    The file appears whole or not at all: it is written under a temporary name, synced and
    renamed, so a reader never sees half a blob; a write that fails (a full disk) removes
    the temporary file.
    """

    def __init__(self, directory: str, idstr: str, instance: int) -> None:
        self.path = os.path.join(directory, config_file_name(idstr, instance))
        self.description = f"config file {self.path}"

    async def load_config(self, data: bytes) -> None:
        await trio.to_thread.run_sync(self._write, data)

    def _write(self, data: bytes) -> None:
        tmp = self.path + ".part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                write_all(fd, [data])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # gone already; the write's error is the one to report
            raise
