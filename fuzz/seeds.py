"""The seed corpus: small valid and almost-valid inputs for each target.

``python -m fuzz --make-corpus`` writes them under fuzz/corpus/<target>/ (named by their
sha1, so reruns are idempotent). Inputs the fuzzer finds may be added there too.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

from fuzz.engine import CORPUS
from fuzz.targets import UUID
from vfiomig._core._wire import (
    encode_device_header,
    encode_handshake,
    encode_packet,
    encode_ram_packet,
    encode_vfio_header,
    wrap_config,
)
from vfiomig.control._proto import encode
from vfiomig.vfio_user import Command
from vfiomig.vfio_user._protocol import encode_message

DEV = "0000:00:04.0/vfio"


def _framer() -> list[bytes]:
    cfg = wrap_config(b"cfg")
    p0 = encode_packet(DEV, 0, 0, 0, b"a" * 40)
    p1 = encode_packet(DEV, 0, 1, 0, b"")
    pc = encode_packet(DEV, 0, 2, 1, cfg)
    ram = encode_ram_packet(2, b"r" * 30, flags=1)
    out = [
        # seed byte, mode byte (bit 0: prepend a handshake, bit 1: ram page count 2)
        bytes([0, 1]) + p0 + p1 + pc,
        bytes([3, 1]) + p0 + encode_packet(DEV, 7, 0xFFFFFFFE, 0, b"x"),
        bytes([5, 3]) + ram + p0 + ram,
        bytes([1, 1]) + p0[:-10],  # ends inside a packet
        bytes([2, 1]) + encode_device_header("x" * 255, 0, 12)[:-8] + b"\xff" * 8,
        bytes([4, 1]) + encode_device_header(DEV, 0, 0xFFFFFFFF) + encode_vfio_header(0),
        bytes([6, 0]) + encode_handshake(UUID, 3) + pc,
        bytes([0, 0]) + encode_handshake(bytes(16), 0),
        bytes([1, 1]) + encode_device_header(DEV, 0, 4)[:-4] + b"\0\0\0\x04",
    ]
    unterminated = bytearray(encode_packet(DEV, 0, 0, 0, b"z"))
    unterminated[12 : 12 + 256] = b"A" * 256
    out.append(bytes([7, 1]) + bytes(unterminated))
    return out


def _wire() -> list[bytes]:
    return [
        encode_handshake(UUID, 3),
        wrap_config(b"body"),
        wrap_config(b""),
        struct.pack(">Q", 0xFFFFFFFFEF100002),
    ]


def _control() -> list[bytes]:
    msgs: list[dict[str, Any]] = [
        {"type": "hello", "version": 1},
        {"type": "precopy", "device": DEV, "instance": 0, "data": b"pre"},
        {"type": "data-complete", "device": DEV, "instance": 0},
        {"type": "switchover-start"},
        {"type": "attach-fd", "device": DEV, "instance": 0, "kind": "data"},
        {"type": "abort", "reason": "test"},
        {"type": "what"},
        {"type": "precopy", "device": 1, "instance": True},
    ]
    return [bytes([3]) + b"".join(encode(m) for m in msgs), bytes([0]) + encode(msgs[4]) * 3]


def _vfio_user() -> list[bytes]:
    version = struct.pack("<HH", 0, 2) + b'{"capabilities":{"max_data_xfer_size":4096}}\0'
    feature = struct.pack("<II", 16 + 8, 0x10001) + struct.pack("<I", 3)
    return [
        bytes([2])
        + encode_message(0, Command.VERSION, version)
        + encode_message(1, Command.DEVICE_FEATURE, feature),
        bytes([0])
        + encode_message(0, Command.VERSION, version, reply=True)
        + encode_message(2, Command.MIG_DATA_WRITE, b"", reply=True, error_no=5),
        bytes([1]) + encode_message(3, Command.MIG_DATA_WRITE, struct.pack("<II", 0, 4) + b"data"),
        bytes([4]) + encode_message(4, Command.MIG_DATA_WRITE, b"x" * 300),
    ]


def _record(command: int, payload: bytes, nfds: int = 0, kind: int = 0) -> bytes:
    return bytes([command, nfds | kind << 2, len(payload)]) + payload


def _vfio_user_server() -> list[bytes]:
    version = struct.pack("<HH", 0, 2) + b'{"capabilities":{"max_msg_fds":4}}\0'
    dma_map = struct.pack("=IIQQQ", 32, 3, 0, 0x10000, 0x2000)
    irqs = struct.pack("=IIIII", 20, 0x24, 1, 0, 2)
    logging = struct.pack("=IIQII", 24, 0x20006, 4096, 0, 0)
    report = struct.pack("=IIQQQ", 48, 0x10008, 0x10000, 0x2000, 4096)
    unmap = struct.pack("=IIQQQQ", 48, 1, 0x10000, 0x2000, 4096, 8)
    tib = 1 << 40
    huge_map = struct.pack("=IIQQQ", 32, 3, 0, 8 * tib, 8 * tib)
    bare_map = struct.pack("=IIQQQ", 32, 3, 0, 16 * tib, 8 * tib)
    huge_report = struct.pack("=IIQQQ", 48, 0x10008, 8 * tib, 8 * tib, tib)
    cfg = struct.pack("=QII", 0x10, 7, 4) + b"\xff\xff\xff\xff"
    return [
        bytes([0])
        + _record(Command.VERSION, version)
        + _record(Command.DMA_MAP, dma_map, 1, 1)
        + _record(Command.DEVICE_SET_IRQS, irqs, 2, 0)
        + _record(Command.DEVICE_FEATURE, logging)
        + _record(Command.DEVICE_FEATURE, report)
        + _record(Command.REGION_WRITE, cfg)
        + _record(Command.DMA_UNMAP, unmap),
        bytes([1])
        + _record(Command.DMA_MAP, dma_map, 1, 2)
        + _record(Command.DMA_MAP, dma_map, 2, 3),
        bytes([1])
        + _record(Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 80, 0, 2, 0, 0, 0)),
        # a hostile VMM: a full blocking eventfd (kept: signalled after every request), a
        # full pipe and a socket as eventfds (refused); 8 TiB with a sparse memfd, and
        # without, then logging in 4 KiB pages and a report in 1 TiB pages
        bytes([1])
        + _record(Command.DEVICE_SET_IRQS, irqs, 2, 4)
        + _record(Command.DEVICE_SET_IRQS, irqs, 2, 5)
        + _record(Command.DEVICE_SET_IRQS, irqs, 2, 6)
        + _record(Command.DMA_MAP, huge_map, 1, 7)
        + _record(Command.DMA_MAP, bare_map)
        + _record(Command.DEVICE_FEATURE, logging)
        + _record(Command.DEVICE_FEATURE, huge_report),
    ]


def _rec(op: int, a: int = 0, b: int = 0, c: int = 0) -> bytes:
    return bytes([op, a, b, c])


def _vfio_user_connection() -> list[bytes]:
    """``[seed][mode][cut][plan x4]`` then ``[op][a][b][c]`` records
    (`fuzz.vfio_user_connection`): op 0 a write of ``a * 16 + b % 16`` bytes (its size
    modulo 4 picks the plan entry), 3 hostile lengths (kind ``c``), 4 set a state, 5 get
    it, 6/7 region read/write, 8 reset, 9 any command, 10 MIG_DATA_READ, 11 odd flags."""
    resuming, limit_64, no_version, fds = 0x40, 0x10, 0x0C, 0x80
    shut, close, cancel = 0, 1, 2
    accept = bytes(4)
    writes = b"".join(_rec(0, a, b) for a, b in ((0, 1), (4, 2), (40, 3), (255, 4), (1, 0)))
    mixed = _rec(5) + _rec(0, 3, 3) + _rec(6, 2, 0, 60) + _rec(7, 0, 8, 16) + _rec(0, 100)
    return [
        bytes([1, resuming | shut, 0]) + accept + writes + mixed,
        bytes([2, resuming | limit_64 | shut, 0])
        + accept
        + b"".join(_rec(3, 2, 5, kind) for kind in (0, 1, 2, 3, 5, 6, 7, 8 + 2))
        + _rec(0, 2, 2)
        + _rec(3, 1, 1, 4),  # a message size over the server's limit: the rest is dropped
        # decline, refuse, short view, read-only; then strided, larger, commit fails, take
        bytes([3, resuming, 0]) + bytes([1, 2, 3, 4]) + writes + _rec(0, 9, 9) + _rec(0, 7, 14),
        bytes([4, resuming, 0]) + bytes([5, 6, 7, 0]) + writes + _rec(0, 9, 9) + _rec(0, 7, 14),
        # cut inside the last body (torn: a reset), by the client ending or a cancel
        bytes([5, resuming | shut, 3]) + accept + writes + _rec(0, 200),
        bytes([6, resuming | cancel, 5]) + accept + writes + _rec(0, 200),
        bytes([7, resuming | close, 9]) + accept + writes + mixed + _rec(0, 200),
        bytes([8, resuming | fds | shut, 0]) + accept + writes * 3 + mixed,
        bytes([9, no_version, 0]) + accept + writes,
        # states, reset, odd commands and flags, a stray reply last (the framing is lost)
        bytes([10, shut, 0])
        + accept
        + _rec(0, 1)
        + _rec(4, 1)  # STOP
        + _rec(0, 1)
        + _rec(4, 2)  # RESUMING
        + _rec(11, 1, 1, 0)  # NO_REPLY
        + _rec(11, 1, 1, 2)  # message type 2
        + _rec(10, 8)
        + _rec(4, 3)  # STOP_COPY: not from RESUMING
        + _rec(8)
        + _rec(9, 0, 99, 5)
        + _rec(4, 0, 250)
        + _rec(0, 1)
        + _rec(11, 1, 1, 1),
        # every write declined: 68 KiB through the server's own buffer, which turns over
        bytes([11, resuming, 0]) + bytes([1, 1, 1, 1]) + _rec(0, 250, 1) * 17 + _rec(6, 2, 0, 60),
    ]


def _vfio_user_dirty() -> list[bytes]:
    """``[log shift][size]`` then ``[op][a][b][c]`` (`fuzz.vfio_user_dirty`): even ops
    mark, odd ops report (``op >> 1 & 3`` pages of misalignment)."""
    marks = bytes([0, 1, 7, 0, 0, 200, 255, 10, 2, 3, 0, 12, 0, 255, 40, 1])
    reports = bytes([1, 0, 255, 3, 1, 1, 10, 0, 3, 0, 255, 7, 5, 2, 100, 5, 7, 0, 3, 6])
    return [
        bytes([0, 0]) + marks + reports,
        bytes([1, 9]) + marks + reports + marks + bytes([3, 0, 255, 7]),
        bytes([2, 255]) + reports + marks + bytes([1, 0, 0, 1]) + reports,
        # 16 KiB logging pages, page 5 dirty, reported in 16 KiB pages from 4 KiB in: the
        # logging page straddles output pages 4 and 5
        bytes([2, 0, 0, 5, 0, 0, 3, 0, 15, 5]),
    ]


SEEDS = {
    "framer": _framer,
    "wire": _wire,
    "control": _control,
    "vfio_user": _vfio_user,
    "vfio_user_server": _vfio_user_server,
    "vfio_user_connection": _vfio_user_connection,
    "vfio_user_dirty": _vfio_user_dirty,
}


def write_corpus(root: Path = CORPUS) -> int:
    n = 0
    for target, make in SEEDS.items():
        d = root / target
        d.mkdir(parents=True, exist_ok=True)
        for data in make():
            path = d / hashlib.sha1(data).hexdigest()[:16]
            if not path.exists():
                path.write_bytes(data)
                n += 1
    return n
