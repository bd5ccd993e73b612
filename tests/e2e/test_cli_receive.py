"""`vfiomig receive` (and `send`) as real processes, fed by a sender written from SPEC.md."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.receive_args import DEV, UUID_TEXT, out_file, receive_args
from tests.e2e.specsender import Receiver, config_blob, handshake, packet, send_streams, spread

UUID = bytes.fromhex("5c6e8d2a9b3f4c1d8e7a6b5c4d3e2f10")


def packets_of(idstr: str, instance: int, state: bytes, config: bytes, size: int) -> list[bytes]:
    chunks = [state[i : i + size] for i in range(0, len(state), size)]
    out = [packet(idstr, instance, i, 0, c) for i, c in enumerate(chunks)]
    return [*out, packet(idstr, instance, len(chunks), 1, config)]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_two_devices_eight_channels_random_order(tmp_path: Path, transport: str) -> None:
    rng = random.Random(7)
    devices = [(DEV, 0), ("0000:00:05.0/vfio", 0)]
    states = {d: rng.randbytes(3 * 1024 * 1024 + d[0].__len__()) for d in devices}
    configs = {d: config_blob(rng.randbytes(300)) for d in devices}
    packets: list[bytes] = []
    for d in devices:
        packets += packets_of(d[0], d[1], states[d], configs[d], 128 * 1024)
    rng.shuffle(packets)
    listen = f"unix:{tmp_path}/data.sock" if transport == "unix" else "tcp:127.0.0.1:0"
    rx = Receiver(
        tmp_path, receive_args(tmp_path, devices, 8, "--max-queued", "1GiB"), listen=listen
    )
    send_streams(rx.data, spread(packets, 8, UUID, lambda k: rng.randrange(8)))
    code, out, err = rx.wait()
    assert code == 0, err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["ok"] is True
    for d in devices:
        assert out_file(tmp_path, *d) == states[d]
        assert (tmp_path / f"{d[0].replace('/', '_')}.{d[1]}.config").read_bytes() == configs[d]
        row = next(r for r in summary["devices"] if r["device"] == d[0])
        assert row["bytes"] == len(states[d]) and row["loaded"]
        assert {"packets", "seconds", "peak_queued_bytes", "starved_seconds"} <= row.keys()


def test_send_and_receive_processes(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, receive_args(tmp_path, [(DEV, 3)], 4))
    send = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfiomig",
            "send",
            "--connect",
            rx.data,
            "--channels",
            "4",
            "--uuid",
            UUID_TEXT,
            "--device",
            f"{DEV}/3=synth:5MiB:4",
            "--packet-size",
            "64KiB",
            "--order",
            "random",
            "--seed",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert send.returncode == 0, send.stderr
    code, _, err = rx.wait()
    assert code == 0, err
    from vfiomig.testing import synth_bytes, synth_config

    assert out_file(tmp_path, DEV, 3) == synth_bytes(5 * 1024 * 1024, 4)
    assert (tmp_path / "0000:00:04.0_vfio.3.config").read_bytes() == synth_config(4)


STATE = bytes(range(256)) * 40  # 10240 bytes: packets of 1024 -> idx 0..9, config idx 10
CFG = config_blob(b"cfg")


def good(i: int) -> bytes:
    return packet(DEV, 0, i, 0, STATE[i * 1024 : (i + 1) * 1024])


def in_order(*packets: bytes) -> list[bytes]:
    return [handshake(UUID, 0) + b"".join(packets)]


CASES = {
    "short packet": (
        in_order(
            good(0),
            struct.pack(">III", MAGIC := 0x11223344, 1, 0x40)
            + DEV.encode().ljust(256, b"\0")
            + struct.pack(">II", 0, 8)
            + bytes(8),
        ),
        "0000:00:04.0/vfio/0: packet too short at 8 (min is 12)",
        1024,
    ),
    "unknown version": (
        in_order(good(0), packet(DEV, 0, 1, 0, b"x", version=1)),
        "0000:00:04.0/vfio/0: packet idx 1 has unknown version 1 (expected 0)",
        1024,
    ),
    "invalid idx": (
        in_order(good(0), packet(DEV, 0, 0xFFFFFFFF, 0, b"x")),
        "0000:00:04.0/vfio/0: packet index is invalid (0xffffffff)",
        1024,
    ),
    "duplicate idx": (
        in_order(good(0), good(2), good(2)),
        "0000:00:04.0/vfio/0: packet idx 2 already received",
        1024,
    ),
    "already written": (
        in_order(good(0), good(1), good(0)),
        "re:0000:00:04.0/vfio/0: packet idx 0 already (received|written)",
        2048,
    ),
    "second config": (
        in_order(good(0), packet(DEV, 0, 10, 1, CFG), packet(DEV, 0, 11, 1, CFG)),
        "0000:00:04.0/vfio/0: second config packet idx 11 (first was idx 10)",
        1024,
    ),
    "data above config": (
        in_order(good(0), packet(DEV, 0, 3, 1, CFG), good(4)),
        "0000:00:04.0/vfio/0: data packet idx 4 is above the config idx 3",
        1024,
    ),
    "payload above cap": (
        in_order(good(0), packet(DEV, 0, 1, 0, bytes(5000))),
        "0000:00:04.0/vfio/0: packet size 5012 is above the cap (4096)",
        1024,
    ),
    "malformed config": (
        in_order(good(0), packet(DEV, 0, 1, 1, b"\0" * 20)),
        "0000:00:04.0/vfio/0: config packet idx 1 starts with 0x0 (expected 0xffffffffef100002)",
        1024,
    ),
    "ends inside a packet": (
        [handshake(UUID, 0) + good(0) + good(1)[:500]],
        "0000:00:04.0/vfio/0: channel ended inside packet idx 1 (212 of 1024 bytes)",
        1024,
    ),
    "missing packets": (
        in_order(*[good(i) for i in range(10) if i not in (4, 6)], packet(DEV, 0, 10, 1, CFG)),
        "0000:00:04.0/vfio/0: every channel ended: missing idx 4, 6 (2 packets)",
        4096,
    ),
    "unknown device": (
        in_order(good(0), packet("0000:00:09.0/vfio", 2, 0, 0, b"x")),
        "0000:00:04.0/vfio/0: not loaded: unknown device '0000:00:09.0/vfio' instance 2 (packet idx 0)",
        1024,
    ),
    "ram packet": (
        in_order(good(0), struct.pack(">III", 0x11223344, 1, 0x01) + bytes(308)),
        "0000:00:04.0/vfio/0: not loaded: channel 0: ram packet with flags 0x1"
        " on a device-state channel (pass --ram-page-count to skip ram packets)",
        1024,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(tmp_path: Path, case: str) -> None:
    streams, message, landed = CASES[case]
    rx = Receiver(
        tmp_path, receive_args(tmp_path, [(DEV, 0)], len(streams), "--packet-cap", "4096")
    )
    send_streams(rx.data, streams)
    code, out, err = rx.wait(timeout=20)
    assert code == 1, err
    assert "Traceback" not in err
    pattern = message[3:] if message.startswith("re:") else re.escape(message)
    assert re.search(f"^vfiomig: {pattern}$", err, re.M), err
    assert err.count("\n") == 1, err  # one line: one failed device
    # nothing beyond the last good in-order byte reached the sink (the failure may stop
    # the loader before it wrote all of them)
    assert STATE[:landed].startswith(out_file(tmp_path, DEV, 0))
    assert json.loads(out)["ok"] is False
    assert not (tmp_path / "0000:00:04.0_vfio.0.config").exists()


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (handshake(bytes(16), 1), "channel 1 has uuid 00000000-0000-0000-0000-000000000000"),
        (handshake(UUID, 0), "channel id 0 already set up"),
        (b"\x11\x22\x33\x00" + handshake(UUID, 1)[4:], "channel handshake has magic 0x11223300"),
        (
            handshake(UUID, 1)[:4] + b"\0\0\0\2" + handshake(UUID, 1)[8:],
            "channel handshake has version 2",
        ),
    ],
    ids=["uuid", "duplicate-id", "magic", "version"],
)
def test_refused_handshake_refuses_only_that_channel(tmp_path: Path, bad: bytes, why: str) -> None:
    rx = Receiver(tmp_path, receive_args(tmp_path, [(DEV, 0)], 2, "-v"))
    first = handshake(UUID, 0) + b"".join(good(i) for i in range(0, 10, 2))
    send_streams(rx.data, [first])
    send_streams(
        rx.data, [bad + b"".join(good(i) for i in range(1, 10, 2)) + packet(DEV, 0, 10, 1, CFG)]
    )
    code, _, err = rx.wait(timeout=20)
    assert code == 1
    assert why in err and "refused" in err
    refused_second = "0000:00:04.0/vfio/0: every channel ended: missing idx 1, 3, 5, 7 (4 packets); config packet not received"
    if bad == handshake(UUID, 0) and refused_second not in err:
        # Two handshakes with id 0: the one the receiver reads first wins, and a loaded
        # machine may read the second connection's first (both are accepted in one burst).
        # Then the good stream was refused: idx 0, 2, ... are missing and nothing landed.
        assert "every channel ended: missing idx 0, 2, 4, 6, 8 (5 packets)" in err, err
        assert out_file(tmp_path, DEV, 0) == b""
        return
    assert refused_second in err, err
    assert STATE[:1024].startswith(out_file(tmp_path, DEV, 0))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "d=null:"], "no config target: pass --config-out DIR or --control ADDR"),
        (
            ["--device", "d", "--config-out", "/tmp"],
            "argument --device: device 'd' must look like IDSTR[/INSTANCE]=SPEC",
        ),
        (
            ["--device", "d=bogus:x", "--config-out", "/tmp"],
            "--device: sink 'bogus:x' has an unknown scheme",
        ),
        (
            ["--device", "d=null:", "--config-out", "/nonexistent"],
            "--config-out /nonexistent is not a directory",
        ),
        (
            ["--listen", "udp:1", "--device", "d=null:", "--config-out", "/tmp"],
            "argument --listen: address 'udp:1' must be tcp:HOST:PORT, unix:PATH or fd:N",
        ),
        (
            ["--device", "d=null:", "--config-out", "/tmp", "--max-queued", "12X"],
            "argument --max-queued: size '12X' is not a number with an optional K/M/G/T unit",
        ),
        (
            ["--device", "d=null:", "--config-out", "/tmp", "--stall-timeout", "-1"],
            "argument --stall-timeout: -1 s is not a positive time",
        ),
        (
            ["--device", "d=null:", "--config-out", "/tmp", "--log-format", "xml"],
            "argument --log-format: invalid choice: 'xml'",
        ),
        (
            [
                "--device",
                "d=null:",
                "--control",
                "tcp:127.0.0.1:0",
                "--gate",
                "control",
                "--config-out",
                "/tmp",
                "--listen",
                "fd:99",
            ],
            "fd:99 is not a socket",
        ),
        (
            ["--device", "d=null:", "--config-out", "/tmp", "--max-pending", "0"],
            "argument --max-pending: 0 is not a positive number",
        ),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    """A usage error: status 2 and one line on stderr that names the option."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfiomig",
            "receive",
            "--listen",
            "tcp:127.0.0.1:0",
            "--channels",
            "1",
            "--uuid",
            UUID_TEXT,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""


def test_sha256_of_landing(tmp_path: Path) -> None:
    """The device spec's instance suffix: only a decimal after the last / is an instance."""
    rx = Receiver(
        tmp_path,
        [
            "--channels",
            "1",
            "--uuid",
            UUID_TEXT,
            "--config-out",
            str(tmp_path),
            "--device",
            f"{DEV}=file:{tmp_path / 'a.out'}",
        ],
    )
    send_streams(rx.data, in_order(*[good(i) for i in range(10)], packet(DEV, 0, 10, 1, CFG)))
    code, _, err = rx.wait()
    assert code == 0, err
    assert (
        hashlib.sha256((tmp_path / "a.out").read_bytes()).digest() == hashlib.sha256(STATE).digest()
    )
    assert (tmp_path / "0000:00:04.0_vfio.0.config").read_bytes() == CFG


def _fd_receiver(tmp: Path, write_fd: int) -> tuple[subprocess.Popen[str], str]:
    ready = tmp / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vfiomig",
            "receive",
            "--listen",
            "tcp:127.0.0.1:0",
            "--channels",
            "2",
            "--uuid",
            UUID_TEXT,
            "--config-out",
            str(tmp),
            "--ready-file",
            str(ready),
            "--device",
            f"{DEV}=fd:{write_fd}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=[write_fd],
    )
    os.close(write_fd)
    import time

    deadline = time.monotonic() + 20
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "receiver did not start"
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())["data"][0]


def test_fd_sink_is_an_inherited_pipe(tmp_path: Path) -> None:
    import threading

    r, w = os.pipe()
    proc, addr = _fd_receiver(tmp_path, w)
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 65536):
            got.extend(chunk)

    t = threading.Thread(target=drain)
    t.start()
    packets = [good(i) for i in range(10)] + [packet(DEV, 0, 10, 1, CFG)]
    send_streams(addr, spread(packets, 2, UUID, lambda k: (k * 7) % 2))
    _, err = proc.communicate(timeout=30)
    t.join(10)
    os.close(r)
    assert proc.returncode == 0, err
    assert bytes(got) == STATE


def test_fd_sink_broken_pipe_fails_with_errno(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(r)
    proc, addr = _fd_receiver(tmp_path, w)
    packets = [good(i) for i in range(10)] + [packet(DEV, 0, 10, 1, CFG)]
    send_streams(addr, spread(packets, 2, UUID, lambda k: k % 2))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert re.search(
        r"^vfiomig: 0000:00:04.0/vfio/0: sink fd:\d+ failed writing idx 0\.\.\d+: Broken pipe \(errno 32\)$",
        err,
        re.M,
    ), err
    assert "Traceback" not in err


def test_the_processes_run_the_core_the_environment_asks_for() -> None:
    """`make test` runs these tests on each core by the environment alone: a process the
    tests start inherits it (a second pass that silently ran the C core tests nothing)."""
    out = subprocess.run(
        [sys.executable, "-c", "import vfiomig; print(vfiomig.IMPLEMENTATION)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    if os.environ.get("VFIOMIG_PUREPYTHON") == "1":
        assert out == "python"
    elif os.environ.get("VFIOMIG_REQUIRE_NATIVE") == "1":
        assert out == "native"
    else:
        assert out in ("python", "native")
