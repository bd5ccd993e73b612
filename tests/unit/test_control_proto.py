"""The control decoder: garbage parses or raises our error, fds go to their message."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfiomig._core._errors import PacketError
from vfiomig.control._proto import (
    MAX_UNCLAIMED,
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


def test_fds_go_to_the_messages_that_carry_fds_in_order() -> None:
    hello = encode({"type": "hello", "version": 1})
    attach = encode({"type": "attach-fd", "device": "d", "instance": 0, "kind": "data"})
    dec = ControlDecoder()
    # hello and attach-fd in one receive, the fd with it (the kernel hands it over with
    # the first receive that reads its sendmsg's first byte): hello must not take it.
    dec.feed(hello + attach, [42])
    assert drain(dec) == [Hello(1), AttachFd("d", 0, "data", (42,))]
    # The fd came with a piece of hello (a batch split by the sender's short write).
    dec.feed(hello[:2], [43])
    dec.feed(hello[2:] + attach)
    assert drain(dec) == [Hello(1), AttachFd("d", 0, "data", (43,))]
    # A message that is not attach-fd never takes or drops an fd: it waits for its own.
    dec.feed(hello, [7])
    dec.feed(encode({"type": "what"}))
    assert drain(dec) == [Hello(1), Unknown("what")]
    assert dec.orphans == [] and dec.pending_fds == [7]
    dec.feed(attach)
    assert drain(dec) == [AttachFd("d", 0, "data", (7,))]
    # A malformed attach-fd still carried its fd: an orphan, not the next one's.
    bad = encode({"type": "attach-fd", "device": "d", "instance": 0, "kind": "nope"})
    dec.feed(bad + attach, [8, 9])
    assert drain(dec) == ["bad", AttachFd("d", 0, "data", (9,))]
    assert dec.orphans == [8]


@given(st.lists(st.sampled_from(["hello", "precopy", "attach"]), max_size=8), st.data())
def test_each_fd_lands_with_its_message_however_the_stream_is_cut(
    kinds: list[str], data: st.DataObject
) -> None:
    """Each attach-fd's fd is sent with some piece at or before its message's last byte
    (SPEC §3: with its message); cut anywhere, every fd lands with its own message."""
    messages = []
    for n, kind in enumerate(kinds):
        if kind == "attach":
            messages.append(encode({"type": "attach-fd", "device": f"d{n}", "instance": 0,
                                    "kind": "data"}))  # fmt: skip
        elif kind == "hello":
            messages.append(encode({"type": "hello", "version": 1}))
        else:
            messages.append(encode({"type": "precopy", "device": "p", "instance": 0, "data": b"x"}))
    stream = b"".join(messages)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=12))))
    pieces = [(a, b) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if a < b]
    # Where each attach-fd's fd goes: any piece that starts at or before its last byte,
    # in message order (fds leave in the order sent).
    fd_piece: dict[int, int] = {}
    at = 0
    earliest = 0
    for n, msg in enumerate(messages):
        end = at + len(msg)
        if kinds[n] == "attach":
            last = max(i for i, (a, _b) in enumerate(pieces) if a < end)
            fd_piece[n] = data.draw(st.integers(earliest, last))
            earliest = fd_piece[n]
        at = end
    dec = ControlDecoder()
    got: list[object] = []
    for i, (a, b) in enumerate(pieces):
        fds = [100 + n for n, p in sorted(fd_piece.items()) if p == i]
        dec.feed(stream[a:b], fds)
        got += drain(dec)
    attached = [m for m in got if isinstance(m, AttachFd)]
    assert [(m.device, m.fds) for m in attached] == [
        (f"d{n}", (100 + n,)) for n in sorted(fd_piece)
    ]
    assert dec.orphans == [] and dec.pending_fds == []


def test_fds_beyond_the_unclaimed_limit_are_orphans() -> None:
    dec = ControlDecoder()
    dec.feed(b"", list(range(100, 100 + MAX_UNCLAIMED + 3)))
    assert dec.orphans == [100, 101, 102]
    assert len(dec.pending_fds) == MAX_UNCLAIMED


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
