"""What `vfiomig send` says when a channel breaks (`send._close.channel_error`): each cause
named in words, with the errno or TLS text when there is one."""

from __future__ import annotations

import errno
import ssl

import trio

from vfiomig.send._close import channel_error


def test_a_reset_says_the_receiver_closed_the_channel() -> None:
    exc = trio.BrokenResourceError()
    exc.__cause__ = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    text = str(channel_error(3, 1024, exc))
    assert text.startswith("channel 3: the receiver closed the channel after 1024 bytes:")
    assert "see the receiver's log (Connection reset by peer (errno 104))" in text


def test_a_tls_error_gives_its_text() -> None:
    exc = trio.BrokenResourceError()
    exc.__cause__ = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert")
    text = str(channel_error(0, 0, exc, tls=True))
    assert text.startswith("channel 0: tls handshake failed after 0 bytes: tls: ")


def test_a_broken_tls_stream_with_nothing_behind_it_is_still_explained() -> None:
    """trio's TLS stream raises a bare BrokenResourceError once another call saw the
    receiver's alert: the message must still say what it means, not just the class."""
    text = str(channel_error(0, 1048864, trio.BrokenResourceError(), tls=True))
    assert text == (
        "channel 0: the tls channel broke after 1048864 bytes (the receiver closed it or"
        " sent an alert): it refused the channel or the migration failed; see the"
        " receiver's log (BrokenResourceError)"
    )
    plain = str(channel_error(0, 10, trio.BrokenResourceError()))
    assert plain == "channel 0: sending failed after 10 bytes: BrokenResourceError"
