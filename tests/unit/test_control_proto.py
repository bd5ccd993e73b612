"""The control decoder: garbage parses or raises our error, fds go to their message."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfiomig._core._errors import PacketError
from vfiomig.control._proto import (
    AttachFd,
    ControlDecoder,
    ControlFramingError,
    ControlMessageError,
    Hello,
    Precopy,
    Unknown,
    encode,
)


def drain(dec: ControlDecoder) -> list[object]:
    out: list[object] = []
    while True:
        try:
            msg = dec.next_message()
        except ControlMessageError:
            out.append("bad")
            continue
        if msg is None:
            return out
        out.append(msg)


@given(st.binary(max_size=300), st.integers(1, 17))
def test_garbage_parses_or_raises_packet_error(data: bytes, step: int) -> None:
    dec = ControlDecoder(max_message=128)
    try:
        for i in range(0, len(data), step):
            dec.feed(data[i : i + step])
            drain(dec)
    except PacketError:
        with pytest.raises(ControlFramingError):  # poisoned for good
            dec.feed(b"\x80")


@given(st.lists(st.binary(max_size=40), max_size=5), st.integers(1, 9))
def test_messages_split_anywhere_decode_whole(chunks: list[bytes], step: int) -> None:
    stream = b"".join(
        encode({"type": "precopy", "device": "d", "instance": 1, "data": c}) for c in chunks
    )
    dec = ControlDecoder()
    got: list[object] = []
    for i in range(0, len(stream), step):
        dec.feed(stream[i : i + step])
        got += drain(dec)
    assert got == [Precopy("d", 1, c) for c in chunks]


def test_fds_go_to_the_message_whose_first_byte_came_with_them() -> None:
    hello = encode({"type": "hello", "version": 1})
    attach = encode({"type": "attach-fd", "device": "d", "instance": 0, "kind": "data"})
    dec = ControlDecoder()
    dec.feed(hello[:3])
    dec.feed(hello[3:] + attach[:5], [42])  # the fd came with attach's first byte
    assert drain(dec) == [Hello(1)]
    dec.feed(attach[5:])
    assert drain(dec) == [AttachFd("d", 0, "data", (42,))]
    # An fd sent with a message that is not attach-fd is an orphan, for the caller to close.
    dec.feed(hello, [7])
    dec.feed(encode({"type": "what"}))
    assert drain(dec) == [Hello(1), Unknown("what")]
    assert dec.orphans == [7] and dec.pending_fds == []


def test_oversize_partial_message_poisons() -> None:
    dec = ControlDecoder(max_message=100)
    big = msgpack.packb({"type": "precopy", "data": b"x" * 90, "pad": "y" * 90})
    dec.feed(big[:150], [5])
    with pytest.raises(ControlFramingError, match="control message above a size limit"):
        dec.next_message()
    assert dec.orphans == [5]
    with pytest.raises(ControlFramingError):
        dec.feed(b"\x80", [9])
    assert dec.orphans == [5, 9]
