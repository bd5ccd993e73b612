"""How a data channel ends on the sending side, and what a broken one is said to be.

SPEC.md §5: ``vfiomig send`` exits 0 only when the receiver took every byte. Without a
control channel the sender knows that from the channels alone: after its last byte it
shuts its sending side down (for TLS: ``close_notify`` first) and waits for the receiver
to close in turn. A vfiomig receiver closes a channel it read to its end in order (FIN)
and resets (RST) a channel it refused or whose session failed, whatever its buffers held,
so an orderly close after our end of stream means every byte was read; a reset, an error,
or bytes on a data channel mean it was not. The wait is bounded (``bound``): a receiver
still writing the last bytes to a slow sink has that long to read them.

The error text says what the sender knows: which channel, how many bytes it had sent on
it, what that means (refused, or the migration failed: the receiver's log says which),
and the cause (the TLS library's text, the errno).
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Sequence

import trio

from vfiomig._core._errors import os_error_text
from vfiomig.send._types import SendError

#: Default bound on the wait for the receiver's close after our last byte.
CLOSE_TIMEOUT = 60.0

#: The errnos of a peer that closed on us (a reset; a write or a shutdown after it).
_CLOSED_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN)

_REFUSED_HINT = "it refused the channel or the migration failed; see the receiver's log"


def describe(exc: BaseException) -> str:
    """The cause of a send failure as one phrase: a TLS error's text, an OSError's
    strerror and errno, found through trio's wrappers (``BrokenResourceError``, the
    group of a failed ``open_tcp_stream``)."""
    found = _os_error(exc)
    if isinstance(found, ssl.SSLCertVerificationError):
        return f"tls: {found.reason}: {found.verify_message}"
    if isinstance(found, ssl.SSLError):
        reason = getattr(found, "reason", None)  # set by the ssl module, not by SSLError()
        return f"tls: {reason}" if reason else f"tls: {found}"
    if found is not None:
        return os_error_text(found)
    return str(exc) or type(exc).__name__


def _os_error(exc: BaseException) -> OSError | None:
    """The innermost OSError with an errno (or a TLS error) behind ``exc``."""
    seen: set[int] = set()
    best: OSError | None = None
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        if isinstance(cur, OSError) and cur.errno is not None:
            best = cur
        if isinstance(cur, BaseExceptionGroup):
            todo.extend(cur.exceptions)
        for nxt in (cur.__cause__, cur.__context__):
            if nxt is not None:
                todo.append(nxt)
    return best


def channel_error(channel: int, sent: int, exc: BaseException, *, tls: bool = False) -> SendError:
    """The failure of data channel ``channel`` after ``sent`` bytes on it."""
    if isinstance(exc, SendError):
        return exc
    cause = describe(exc)
    found = _os_error(exc)  # what the cause chain says, looked up once for every case
    if isinstance(found, OSError) and found.errno in _CLOSED_ERRNOS:
        text = (
            f"channel {channel}: the receiver closed the channel after {sent} bytes:"
            f" {_REFUSED_HINT} ({cause})"
        )
    elif tls and isinstance(found, ssl.SSLError):
        text = f"channel {channel}: tls handshake failed after {sent} bytes: {cause}"
    elif tls and found is None:
        # trio's TLS stream, once broken (the receiver's alert or close seen by another
        # call), raises a bare BrokenResourceError: no errno or TLS text is left to give.
        text = (
            f"channel {channel}: the tls channel broke after {sent} bytes (the receiver"
            f" closed it or sent an alert): {_REFUSED_HINT} ({cause})"
        )
    else:
        text = f"channel {channel}: sending failed after {sent} bytes: {cause}"
    error = SendError(text)
    error.__cause__ = exc
    return error


async def end_channel(stream: trio.abc.Stream, channel: int, sent: int, bound: float) -> None:
    """Shut our sending side of ``stream`` down and wait, at most ``bound`` seconds, for
    the receiver to close in order.

    Raises:
        SendError: a reset, a TLS or socket error, bytes from the receiver, or no close
            in time; the message names the channel and what it means.
    """
    tls = isinstance(stream, trio.SSLStream)
    raw = stream
    with trio.move_on_after(bound) as scope:
        try:
            if isinstance(stream, trio.SSLStream):
                # Our close_notify, then the receiver's (sent when it closes): TLS's own
                # end of stream, which plain EOF cannot fake. The socket stream is ours
                # to close from here on (the TLS stream's close no longer does it).
                raw, _ = await stream.unwrap()
            if isinstance(raw, trio.abc.HalfCloseableStream):
                await raw.send_eof()
            data = await raw.receive_some(4096)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise channel_error(channel, sent, exc, tls=tls) from exc
        finally:
            if raw is not stream:
                await trio.aclose_forcefully(raw)
        if data:
            raise SendError(
                f"channel {channel}: the receiver sent {len(data)} bytes on a data channel"
                " instead of closing it"
            )
    if scope.cancelled_caught:
        raise SendError(
            f"channel {channel}: the receiver did not close the channel within {bound:g} s"
            f" of the last byte ({sent} bytes sent): it may still be loading; see its log"
        )


async def end_channels(
    streams: Sequence[trio.abc.Stream], sent: Sequence[int], bound: float
) -> None:
    """`end_channel` on every channel at once; the first failure (by channel) is raised."""
    failures: list[tuple[int, SendError]] = []

    async def one(i: int) -> None:
        try:
            await end_channel(streams[i], i, sent[i], bound)
        except SendError as exc:
            failures.append((i, exc))

    async with trio.open_nursery() as nursery:
        for i in range(len(streams)):
            nursery.start_soon(one, i)
    if failures:
        raise min(failures, key=lambda f: f[0])[1]
