"""`vfiomig receive --control` as a real process, driven by a VMM's control client written
from SPEC.md §3 alone (`tests.e2e.specsender.ControlPeer`): fds sent every way a stream
allows land with their message, and a peer that leaves at any step leaves no hang."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.forked import Forked, wait_ready
from tests.e2e.specsender import ControlPeer, send_streams
from vfiomig.testing import channel_streams, device_packets, synth_config

UUID = "00112233-4455-6677-8899-aabbccddeeff"
UUID_BYTES = bytes.fromhex(UUID.replace("-", ""))
encode = ControlPeer.encode


def idstr(k: int) -> str:
    return f"0000:00:{k:02x}.0/vfio"


def attach(k: int) -> bytes:
    return encode({"type": "attach-fd", "device": idstr(k), "instance": 0, "kind": "data"})


HELLO = encode({"type": "hello", "version": 1})


def start_receiver(tmp: Path, devices: list[str], *extra: str) -> tuple[Forked, dict[str, object]]:
    run = tmp / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    argv = [
        "receive", "--listen", "tcp:127.0.0.1:0", "--channels", "2", "--uuid", UUID,
        "--control", f"unix:{run}/ctl", "--ready-file", str(tmp / "ready.json"), "--json",
        *extra,
    ]  # fmt: skip
    for dev in devices:
        argv += ["--device", dev]
    proc = Forked(argv, tmp, "receiver")
    return proc, wait_ready(proc, tmp / "ready.json")


def test_attach_fd_lands_with_its_message_however_the_stream_is_cut(
    tmp_path: Path, peers: list[ControlPeer]
) -> None:
    """hello then attach-fd, never waiting for the hello reply: in one send, cut at every
    byte (the fd with the first piece, or with the last), and several attach-fds with
    their fds in one send. Each device's data must land in the file its fd opened."""
    batch_len = len(HELLO + attach(0))
    plans: list[tuple[str, int]] = [("whole", 0)]
    plans += [("fd-first", cut) for cut in range(1, batch_len)]
    plans += [("fd-last", cut) for cut in range(1, batch_len, 7)]
    plans += [("three-at-once", 0)]
    n_devices = len(plans) + 2  # three-at-once attaches three devices
    states = {k: random.Random(k).randbytes(3000 + k) for k in range(n_devices)}
    proc, info = start_receiver(
        tmp_path,
        [f"{idstr(k)}=attach:60" for k in range(n_devices)],
        "--gate", "open", "--config-out", str(tmp_path),
    )  # fmt: skip
    fds = {k: os.open(tmp_path / f"{k}.out", os.O_WRONLY | os.O_CREAT, 0o600) for k in states}
    peer = ControlPeer(str(info["control"]).removeprefix("unix:"))
    peers.append(peer)
    k = 0
    for how, cut in plans:
        batch = HELLO + attach(k)
        if how == "whole":
            peer.send(batch, [fds[k]])
        elif how == "fd-first":
            peer.send(batch[:cut], [fds[k]])
            peer.send(batch[cut:])
        elif how == "fd-last":
            peer.send(batch[:cut])
            peer.send(batch[cut:], [fds[k]])
        else:  # three attach-fds and their three fds in flight together
            peer.send(attach(k) + attach(k + 1) + attach(k + 2), [fds[k], fds[k + 1], fds[k + 2]])
            k += 2
        k += 1
    assert k == n_devices
    for fd in fds.values():
        os.close(fd)  # the receiver holds its own copies now
    # Read the events as they come (the hello replies fill a socket buffer otherwise).
    reader = threading.Thread(target=_drain, args=(peer,))
    reader.start()
    packets: list[bytes] = []
    for k, state in states.items():
        packets += device_packets(idstr(k), 0, state, synth_config(k), 1000)
    random.Random(1).shuffle(packets)
    data = str(info["data"][0])  # type: ignore[index]
    send_streams(data, channel_streams(packets, 2, UUID_BYTES, seed=3))
    assert proc.wait(60) == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "claimed" not in proc.stderr, proc.stderr
    for k, state in states.items():
        assert (tmp_path / f"{k}.out").read_bytes() == state, f"device {k} ({plans})"
    reader.join(30)
    hellos = [e for e in peer.events if e["type"] == "hello"]
    assert len(hellos) == len(plans) - 1  # every batch but three-at-once had a hello
    assert not [e for e in peer.events if e["type"] == "error"], peer.events
    assert peer.events[-1] == {"type": "done", "ok": True}
    peer.close()


def _drain(peer: ControlPeer) -> list[dict[str, object]]:
    try:
        while True:
            peer.next_event(10)
    except EOFError:
        pass
    return peer.events


@pytest.fixture
def peers() -> Iterator[list[ControlPeer]]:
    """Control peers a test opened, closed at its end whatever happened."""
    opened: list[ControlPeer] = []
    yield opened
    for peer in opened:
        peer.close()


STEPS = ["connect", "hello", "precopy", "switchover", "config"]
# Once the config was taken the receiver is done before anyone could reconnect.
CASES = [
    (s, t) for s in STEPS for t in ("reconnect", "nobody") if (s, t) != ("config", "reconnect")
]


@pytest.mark.parametrize(("step", "then"), CASES)
def test_a_peer_that_leaves_at_any_step_leaves_no_hang(
    tmp_path: Path, peers: list[ControlPeer], step: str, then: str
) -> None:
    """The VMM goes away after ``step``; ``then`` another connects (and must get its hello
    reply first, then the config it missed) or nobody does (the receiver must end within
    its stall timeout, saying why)."""
    state = random.Random(5).randbytes(50_000)
    config = synth_config(5)
    precopy = b"main-channel state" * 10
    out = tmp_path / "state.out"
    proc, info = start_receiver(
        tmp_path, [f"{idstr(4)}=file:{out}"], "--stall-timeout", "2", "--gate", "control"
    )
    control = str(info["control"]).removeprefix("unix:")
    data = str(info["data"][0])  # type: ignore[index]
    streams = channel_streams(
        device_packets(idstr(4), 0, state, config, 5000), 2, UUID_BYTES, seed=1
    )
    first = ControlPeer(control)
    peers.append(first)
    index = STEPS.index(step)
    if index >= 1:
        first.send(HELLO)
        assert first.expect("hello")["devices"] == [{"device": idstr(4), "instance": 0}]
    if index >= 2:
        first.send(encode({"type": "precopy", "device": idstr(4), "instance": 0, "data": precopy}))
    if index >= 3:
        first.send(encode({"type": "switchover-start"}))
    send_streams(data, streams)
    if index >= 4:
        assert first.expect("config")["data"] == config
    first.close()  # gone, without a word
    if then == "reconnect":
        second = ControlPeer(control)
        peers.append(second)
        second.send(HELLO)
        assert second.next_event()["type"] == "hello"  # the reply first, then the rest
        if index < 3:
            second.send(encode({"type": "switchover-start"}))
        assert second.expect("config")["data"] == config
        assert second.expect("loaded")["bytes"] == len(state) + (len(precopy) if index >= 2 else 0)
        assert second.expect("done") == {"type": "done", "ok": True}
        second.close()
    start = time.monotonic()
    code = proc.wait(30)
    err = proc.stderr
    assert "Traceback" not in err
    if then == "reconnect" or step == "config":
        assert code == 0, err
        landed = out.read_bytes()
        assert landed == (precopy if index >= 2 else b"") + state
        return
    assert code == 1, err
    assert time.monotonic() - start < 15
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False
    if step == "switchover":
        assert "config event" in err and "undelivered: no control connection took it" in err
        assert "waits for a control connection" in err  # the warnings while it waited
    else:
        assert "waiting for its gate" in err, err
