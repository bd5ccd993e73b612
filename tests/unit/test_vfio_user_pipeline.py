"""The MIG_DATA pipelines against a scripted peer on a socketpair: replies matched by
msg_id in any order, data delivered in request order, and any reply stream either
accepted or refused with a vfiomig error (never another exception)."""

from __future__ import annotations

import socket
import struct

import trio
from hypothesis import given
from hypothesis import strategies as st

from vfiomig._core._errors import VfioMigError
from vfiomig.vfio_user._header import HEADER
from vfiomig.vfio_user.client._pipeline import WriteFailed, WritePipeline
from vfiomig.vfio_user.client._read_pipeline import ReadPipeline

WRITE, READ = 18, 17
REQUEST = struct.Struct("=HHIIIII")  # header + argsz, size


def pair() -> tuple[socket.socket, socket.socket]:
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    return client, server


def read_requests(server: socket.socket, count: int) -> list[tuple[int, int, bytes]]:
    """``count`` whole requests: (msg_id, size field, data)."""
    out = []
    for _ in range(count):
        head = server.recv(REQUEST.size, socket.MSG_WAITALL)
        msg_id, _, msg_size, _, _, _, size = REQUEST.unpack(head)
        rest = msg_size - REQUEST.size
        data = server.recv(rest, socket.MSG_WAITALL) if rest else b""
        out.append((msg_id, size, data))
    return out


def reply(msg_id: int, command: int, payload: bytes = b"", errno: int | None = None) -> bytes:
    flags = 1 | (0x20 if errno is not None else 0)
    return HEADER.pack(msg_id, command, 16 + len(payload), flags, errno or 0) + payload


def test_write_replies_in_any_order_and_the_first_refusal_by_send_order() -> None:
    client, server = pair()

    async def main() -> WriteFailed:
        pipe = WritePipeline(client, "peer", timeout=5, window=8)
        data = memoryview(bytes(range(100)))
        await pipe.write([([data[i * 10 : i * 10 + 10]], 10, (i, i + 1)) for i in range(6)])
        sent = read_requests(server, 6)
        assert [bytes(d) for _, _, d in sent] == [
            bytes(data[i * 10 : i * 10 + 10]) for i in range(6)
        ]
        # Answered backwards; writes 4 and 2 refused: the first by send order is 2.
        for k in reversed(range(6)):
            msg_id = sent[k][0]
            server.sendall(reply(msg_id, WRITE, errno={4: 28, 2: 5}.get(k)))
        try:
            await pipe.flush()
        except WriteFailed as exc:
            return exc
        raise AssertionError("no failure")

    failure = trio.run(main)
    server.close()
    client.close()
    assert (failure.errno, failure.idx) == (5, 2)
    text = str(failure)
    assert text.startswith("peer: MIG_DATA_WRITE (10 bytes at stream offset 20, data of idx 2..2)")
    assert text.endswith("; 3 writes were in flight behind it (2 taken, 1 refused)")


def test_read_replies_out_of_order_come_out_in_request_order() -> None:
    client, server = pair()

    async def main() -> bytes:
        pipe = ReadPipeline(client, "peer", timeout=5, window=4, size=8)
        got = bytearray()

        async def peer() -> None:
            await trio.to_thread.run_sync(answer)

        def answer() -> None:
            requests = read_requests(server, 4)
            chunks = [b"aaaa", b"bbbbbbbb", b"cc", b""]
            for (msg_id, size, _), chunk in reversed(list(zip(requests, chunks, strict=True))):
                # libvfio-user pads each reply to the size asked.
                body = struct.pack("=II", 8 + len(chunk), len(chunk)) + chunk
                server.sendall(reply(msg_id, READ, body + bytes(size - len(chunk))))
            # Reads sent before the end was seen get 0 bytes, until the client is done.
            while head := server.recv(REQUEST.size, socket.MSG_WAITALL):
                msg_id = REQUEST.unpack(head)[0]
                server.sendall(reply(msg_id, READ, struct.pack("=II", 8, 0) + bytes(8)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            while pieces := await pipe.read(5):
                assert sum(map(len, pieces)) <= 5
                for piece in pieces:
                    got += piece
            client.shutdown(socket.SHUT_WR)
        return bytes(got)

    assert trio.run(main) == b"aaaabbbbbbbbcc"
    server.close()
    client.close()


@given(st.binary(max_size=200), st.integers(1, 4))
def test_any_reply_stream_is_accepted_or_refused_cleanly(garbage: bytes, writes: int) -> None:
    client, server = pair()

    async def main() -> None:
        pipe = WritePipeline(client, "peer", timeout=2, window=8)
        await pipe.write([([memoryview(b"x")], 1, None) for _ in range(writes)])
        read_requests(server, writes)
        server.sendall(garbage)
        server.shutdown(socket.SHUT_WR)
        try:
            await pipe.flush()
        except VfioMigError:
            pass

    try:
        trio.run(main)
    finally:
        server.close()
        client.close()
