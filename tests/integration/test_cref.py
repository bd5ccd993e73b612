"""The C reference (benchmarks/cref): builds, and moves a transfer intact in any order.

The reference is the baseline of every speed comparison, so it must be right before it is
fast: these runs check the receiver's output sha256 against the sender's pattern computed in
Python, and the config blob against what the sender put in its config packet.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from benchmarks.cref import (
    DEFAULT_UUID,
    build,
    config_blob,
    expected_sha256,
    run_transfer,
    start_sender,
    wait_ready,
)

SIZE = 8 << 20


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("packet_size", "order", "mode"),
    [
        (4096, "random", "epoll"),
        (4096, "random", "threads"),
        (4096, "random", "writer-thread"),
        (1 << 20, "random", "epoll"),
        (1 << 20, "roundrobin", "writer-thread"),
        (300 << 10, "reverse", "threads"),  # > the receiver's direct-read threshold, odd size
        (65536 + 3, "idx0-last", "epoll"),
    ],
)
def test_transfer_is_written_in_order(
    tmp_path: Path, packet_size: int, order: str, mode: str
) -> None:
    out, cfg = tmp_path / "out.bin", tmp_path / "config.bin"
    size = SIZE + 12345  # a short last packet
    result = run_transfer(
        channels=4,
        size=size,
        packet_size=packet_size,
        output=str(out),
        config=cfg,
        order=order,
        seed=7,
        mode=mode,
        timeout=30,
    )
    npackets = -(-size // packet_size)
    assert result.receiver["bytes"] == size
    assert result.receiver["packets"] == npackets + 1
    assert result.sender["bytes"] == size
    assert _sha256(out) == expected_sha256(size, packet_size, seed=7)
    assert cfg.read_bytes() == config_blob(size, packet_size)


def test_several_devices_get_their_own_files(tmp_path: Path) -> None:
    result = run_transfer(
        channels=3,
        size=1 << 20,
        packet_size=4096,
        output=str(tmp_path / "dev{instance}.bin"),
        config=tmp_path / "dev{instance}.config",
        order="random",
        devices=2,
        timeout=30,
    )
    assert result.receiver["devices"] == 2
    for device in range(2):
        assert _sha256(tmp_path / f"dev{device}.bin") == expected_sha256(
            1 << 20, 4096, device=device
        )
        assert (tmp_path / f"dev{device}.config").read_bytes() == config_blob(
            1 << 20, 4096, device=device
        )


def test_pipe_output_with_drainer() -> None:
    result = run_transfer(channels=2, size=SIZE, packet_size=1 << 20, output="pipe", timeout=30)
    assert result.drainer is not None
    assert result.drainer["bytes"] == SIZE


def test_unix_socket(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    run_transfer(
        channels=2,
        size=SIZE,
        packet_size=65536,
        listen=f"unix:{tmp_path / 'sock'}",
        output=str(out),
        timeout=30,
    )
    assert _sha256(out) == expected_sha256(SIZE, 65536)


def _start_receiver(tmp_path: Path, *, channels: int) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp_path / "ready.json"
    argv = [str(build()["cref_recv"]), "tcp:127.0.0.1:0", str(channels), DEFAULT_UUID, "null"]
    recv = subprocess.Popen(
        [*argv, "--ready-file", str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    return recv, wait_ready(ready, recv)[0]


def test_wrong_uuid_channel_is_refused_others_carry_on(tmp_path: Path) -> None:
    recv, address = _start_receiver(tmp_path, channels=2)
    try:
        other = start_sender(address, channels=2, size=1 << 20, packet_size=4096, uuid="ff" * 16)
        other.communicate(timeout=10)
        good = start_sender(address, channels=2, size=1 << 20, packet_size=4096)
        good_out, _ = good.communicate(timeout=10)
        out, err = recv.communicate(timeout=10)
    finally:
        recv.kill()
        recv.wait()
    assert good.returncode == 0, good_out
    assert recv.returncode == 0, err
    assert b"wrong uuid" in err
    assert b'"bytes": 1048576' in out


def _packet(idx: int, data: bytes, *, flags: int = 0, size: int | None = None) -> bytes:
    payload = struct.pack(">III", 0, idx, flags) + data
    header = struct.pack(">III256sII", 0x11223344, 1, 0x40, b"dev", 0, size or len(payload))
    return header + payload


def _run_raw(tmp_path: Path, stream: bytes) -> tuple[int, str]:
    """Feed one channel of raw bytes to cref_recv; return its exit code and stderr."""
    recv, address = _start_receiver(tmp_path, channels=1)
    try:
        host, port = address.removeprefix("tcp:").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            hs = struct.pack(">II16sB39x", 0x11223344, 1, bytes.fromhex(DEFAULT_UUID), 0)
            sock.sendall(hs + stream)
        _, err = recv.communicate(timeout=10)
    finally:
        recv.kill()
        recv.wait()
    return recv.returncode, err.decode()


CONFIG = struct.pack(">Q", 0xFFFFFFFFEF100002) + struct.pack(">Q", 0xFFFFFFFFEF100001)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (_packet(0, b"x" * 100)[:200], "channel 0 ended inside a packet"),
        (_packet(0, b"x") + _packet(0, b"y"), "dev/0: packet idx 0 already received"),
        (_packet(0, b"x", size=(64 << 20) + 1), "next_packet_size 67108865 is out of range"),
        (_packet(1, b"x") + _packet(1, CONFIG, flags=1), "packet idx 1 already received"),
        (_packet(0, b"bad config", flags=1), "malformed config blob idx 0"),
        (_packet(2, b"x") + _packet(1, CONFIG, flags=1), "data packet idx 2 is above"),
        (_packet(1, b"x") + _packet(2, CONFIG, flags=1), "packet idx 0 missing (of 2)"),
        (_packet(0, b"x"), "without the config packet"),
    ],
)
def test_bad_streams_fail_with_a_message(tmp_path: Path, stream: bytes, message: str) -> None:
    code, err = _run_raw(tmp_path, stream)
    assert code == 1
    assert message in err


def test_good_raw_stream(tmp_path: Path) -> None:
    code, err = _run_raw(tmp_path, _packet(1, b"b") + _packet(2, CONFIG, flags=1) + _packet(0, b""))
    assert code == 0, err


@pytest.mark.parametrize("data", ["file", "fd"])
def test_sender_carries_a_files_or_a_pipes_bytes(tmp_path: Path, data: str) -> None:
    """``--data file:PATH`` and ``--data fd:N`` (compare_send's cref-same): the bytes
    received are the source's, in order, whatever channel took each packet."""
    state = tmp_path / "state"
    size = (1 << 20) + 4097  # a short last packet
    state.write_bytes(bytes(range(256)) * (size // 256) + b"\x07" * (size % 256))
    out = tmp_path / "out.bin"
    ready = tmp_path / "ready.json"
    argv = [str(build()["cref_recv"]), "tcp:127.0.0.1:0", "3", DEFAULT_UUID, str(out)]
    recv = subprocess.Popen(
        [*argv, "--ready-file", str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    feeder = None
    try:
        address = wait_ready(ready, recv)[0]
        if data == "file":
            send = start_sender(
                address, channels=3, size=size, packet_size=4096, data=f"file:{state}"
            )
        else:
            rfd, wfd = os.pipe()
            feeder = subprocess.Popen(["cat", str(state)], stdout=wfd)
            os.close(wfd)
            send = start_sender(
                address, channels=3, size=size, packet_size=4096, data=f"fd:{rfd}",
                pass_fds=(rfd,),
            )  # fmt: skip
            os.close(rfd)
        sout, serr = send.communicate(timeout=30)
        _, rerr = recv.communicate(timeout=30)
    finally:
        for proc in (recv, feeder):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert send.returncode == 0, serr
    assert recv.returncode == 0, rerr
    assert b'"bytes": %d' % size in sout
    assert out.read_bytes() == state.read_bytes()


def test_sender_fails_when_the_pipe_ends_early(tmp_path: Path) -> None:
    recv, address = _start_receiver(tmp_path, channels=2)
    rfd, wfd = os.pipe()
    os.write(wfd, b"x" * 10000)
    os.close(wfd)
    try:
        send = start_sender(
            address, channels=2, size=1 << 20, packet_size=4096, data=f"fd:{rfd}",
            pass_fds=(rfd,),
        )  # fmt: skip
        os.close(rfd)
        _, err = send.communicate(timeout=30)
    finally:
        recv.kill()
        recv.communicate()
    assert send.returncode == 1
    assert b"reading the stream" in err
