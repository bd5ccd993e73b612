"""A sender written from SPEC.md alone (struct and socket, nothing from vfiomig), to test
`vfiomig receive` as another implementation would."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

MAGIC = 0x11223344
CONFIG_HEAD = struct.pack(">Q", 0xFFFFFFFFEF100002)
CONFIG_TAIL = struct.pack(">Q", 0xFFFFFFFFEF100001)


def handshake(uuid: bytes, channel: int) -> bytes:
    return struct.pack(">II16sB", MAGIC, 1, uuid, channel) + bytes(39)


def packet(
    idstr: str, instance: int, idx: int, flags: int, data: bytes, *, version: int = 0
) -> bytes:
    body = struct.pack(">III", version, idx, flags) + data
    return (
        struct.pack(">III", MAGIC, 1, 0x40)
        + idstr.encode().ljust(256, b"\0")
        + struct.pack(">II", instance, len(body))
        + body
    )


def config_blob(body: bytes) -> bytes:
    return CONFIG_HEAD + body + CONFIG_TAIL


def connect(addr: str) -> socket.socket:
    kind, _, rest = addr.partition(":")
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(rest)
        return s
    host, _, port = rest.rpartition(":")
    return socket.create_connection((host, int(port)))


def send_streams(addr: str, streams: Sequence[bytes | Iterator[bytes]]) -> None:
    """Open every channel first, then send each one's bytes from its own thread."""
    socks = [connect(addr) for _ in streams]
    errors: list[BaseException] = []

    def pump(sock: socket.socket, data: bytes | Iterator[bytes]) -> None:
        try:
            for part in [data] if isinstance(data, bytes) else data:
                sock.sendall(part)
        except OSError as exc:  # the receiver may close on error: that is its right
            errors.append(exc)
        finally:
            sock.close()

    threads = [
        threading.Thread(target=pump, args=(s, d)) for s, d in zip(socks, streams, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


class Receiver:
    """`vfiomig receive` as a real process, with its ready file read."""

    def __init__(self, tmp: Path, args: Sequence[str], *, listen: str = "tcp:127.0.0.1:0") -> None:
        self.ready = tmp / "ready.json"
        cmd = [
            sys.executable,
            "-m",
            "vfiomig",
            "receive",
            "--listen",
            listen,
            "--ready-file",
            str(self.ready),
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _out, err = self.proc.communicate(timeout=5)
                raise AssertionError(f"receiver did not start: {err}")
            time.sleep(0.02)
        self.addresses = json.loads(self.ready.read_text())

    @property
    def data(self) -> str:
        return str(self.addresses["data"][0])

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def spread(
    packets: Sequence[bytes], channels: int, uuid: bytes, choose: Callable[[int], int]
) -> list[bytes]:
    streams = [bytearray(handshake(uuid, c)) for c in range(channels)]
    for k, p in enumerate(packets):
        streams[choose(k)] += p
    return [bytes(s) for s in streams]


class ControlPeer:
    """A VMM's control client written from SPEC.md §3 alone: msgpack maps on a UNIX
    socket, one fd as SCM_RIGHTS with each ``attach-fd``, no waiting for replies unless
    the test asks for an event."""

    def __init__(self, path: str) -> None:
        import msgpack

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.events: list[dict[str, object]] = []

    @staticmethod
    def encode(msg: dict[str, object]) -> bytes:
        import msgpack

        data = msgpack.packb(msg, use_bin_type=True)
        assert isinstance(data, bytes)
        return data

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """``data`` in as few sends as the kernel takes; ``fds`` go with the first."""
        import array

        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = self.sock.sendmsg([data], anc if fds else [])
        self.sock.sendall(data[sent:])

    def next_event(self, timeout: float = 30) -> dict[str, object]:
        self.sock.settimeout(timeout)
        while True:
            for obj in self.unpacker:
                self.events.append(obj)
                return obj  # type: ignore[no-any-return]
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"control channel closed; events so far: {self.events}")
            self.unpacker.feed(data)

    def expect(self, kind: str, timeout: float = 30) -> dict[str, object]:
        """The next event of type ``kind``, skipping ``progress``; anything else fails."""
        while True:
            ev = self.next_event(timeout)
            if ev["type"] == kind:
                return ev
            assert ev["type"] == "progress", f"expected {kind}, got {ev}"

    def close(self) -> None:
        self.sock.close()
