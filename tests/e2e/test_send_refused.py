"""`vfiomig send` against a receiver that refuses it, every way a receiver refuses: exit 1,
in 20 of 20 runs, with a line that says what the sender knows (SPEC.md §5: exit 0 means
the receiver took every byte). Receivers and senders are real processes (forked, see
`tests.e2e.forked`, so that twenty runs stay cheap)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.forked import Forked, wait_ready

UUID = "5c6e8d2a-9b3f-4c1d-8e7a-6b5c4d3e2f10"
OTHER_UUID = "00000000-9b3f-4c1d-8e7a-6b5c4d3e2f10"
DEV = "0000:00:04.0/vfio"
RUNS = 20
#: Runs at once (each is a process of its own; together they use both cores).
BATCH = 5
SIZE = "4M"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    trustme = pytest.importorskip("trustme")
    tmp = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp / "other.pem"))
    return {
        "server": str(tmp / "server.pem"),
        "ca": str(tmp / "ca.pem"),
        "other": str(tmp / "other.pem"),
    }


def receiver(tmp: Path, name: str, *extra: str, channels: int = 2) -> tuple[Forked, str]:
    """A forked `vfiomig receive` on loopback; its data address."""
    ready = tmp / f"{name}.ready"
    argv = [
        "receive", "--listen", "tcp:127.0.0.1:0", "--channels", str(channels),
        "--uuid", UUID, "--config-out", str(tmp), "--gate", "open", "--ready-file", str(ready),
        *extra,
    ]  # fmt: skip
    proc = Forked(argv, tmp, name)
    addresses = wait_ready(proc, ready)
    data = addresses["data"]
    assert isinstance(data, list)
    return proc, str(data[0])


def send(tmp: Path, name: str, addr: str, *extra: str, channels: int = 2) -> Forked:
    argv = [
        "send", "--connect", addr, "--channels", str(channels), "--json",
        "--device", f"{DEV}=synth:{SIZE}:3", *extra,
    ]  # fmt: skip
    if "--uuid" not in extra:
        argv += ["--uuid", UUID]
    return Forked(argv, tmp, name)


def check_refused(proc: Forked, message: str) -> None:
    code = proc.wait(60)
    err = proc.stderr
    assert code == 1, f"exit {code}: {err}"
    assert "Traceback" not in err
    assert message in err, err
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False and summary["error"] in err


REFUSED = "the receiver closed the channel after"
HINT = "it refused the channel or the migration failed; see the receiver's log"


def test_unknown_device_fails_every_run(tmp_path: Path) -> None:
    """The receiver fails at the first packet: the sender must never report success,
    however much the socket buffers had taken (the original bug: 7 of 10 runs exited 0)."""
    for first in range(0, RUNS, BATCH):
        runs = range(first, first + BATCH)
        rxs = [receiver(tmp_path, f"rx{n}", "--device", "0000:00:05.0/vfio=null:") for n in runs]
        txs = [send(tmp_path, f"tx{n}", addr) for n, (_rx, addr) in zip(runs, rxs, strict=True)]
        for tx, (rx, _addr), n in zip(txs, rxs, runs, strict=True):
            check_refused(tx, REFUSED)
            assert HINT in tx.stderr
            assert rx.wait(30) == 1
            assert "unknown device '0000:00:04.0/vfio' instance 0" in rx.stderr
            assert not (tmp_path / f"rx{n}.ready").exists()


def test_channel_count_mismatch_fails_every_run_with_its_own_error(tmp_path: Path) -> None:
    for first in range(0, RUNS, BATCH):
        runs = range(first, first + BATCH)
        rxs = [receiver(tmp_path, f"rx{n}", "--device", f"{DEV}=null:", channels=4) for n in runs]
        txs = [
            send(tmp_path, f"tx{n}", addr, channels=6)
            for n, (_rx, addr) in zip(runs, rxs, strict=True)
        ]
        for tx, (rx, _addr) in zip(txs, rxs, strict=True):
            check_refused(tx, "channel")
            assert rx.wait(30) == 1
            err = rx.stderr
            assert "the sender opens more channels than this receiver expects" in err or (
                "does the sender open more channels than --channels?" in err
            ), err


@pytest.fixture
def long_lived(tmp_path: Path, certs: dict[str, str]) -> Iterator[dict[str, tuple[Forked, str]]]:
    """Receivers that refuse a channel and go on serving (a refusal is not a failure)."""
    dev = ["--device", f"{DEV}=null:"]
    tls = ["--tls-cert", certs["server"], "--tls-key", certs["server"]]
    procs = {
        "plain": receiver(tmp_path, "plain", *dev),
        "tls": receiver(tmp_path, "tls", *dev, *tls),
        "mutual": receiver(tmp_path, "mutual", *dev, *tls, "--tls-ca", certs["ca"]),
    }
    yield procs
    for name, (proc, _addr) in procs.items():
        proc.kill(15)  # SIGTERM: aborts the session, one line per device, exit 1
        assert proc.wait(30) == 1
        assert "migration aborted: received SIGTERM" in proc.stderr
        assert not (tmp_path / f"{name}.ready").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong-uuid", REFUSED),
        ("plain-to-tls", REFUSED),
        ("tls-to-plain", "channel 0: "),
        ("no-client-cert", "channel "),
        ("untrusted-receiver", "channel 0: tls handshake failed after 0 bytes: tls: "),
        ("nobody-listening", "cannot connect to tcp:127.0.0.1:"),
    ],
)
def test_refused_stream_exits_1_every_run(
    tmp_path: Path,
    long_lived: dict[str, tuple[Forked, str]],
    certs: dict[str, str],
    case: str,
    message: str,
) -> None:
    target, extra = {
        "wrong-uuid": ("plain", ["--uuid", OTHER_UUID]),
        "plain-to-tls": ("tls", []),
        "tls-to-plain": ("plain", ["--tls-ca", certs["ca"]]),
        "no-client-cert": ("mutual", ["--tls-ca", certs["ca"]]),
        "untrusted-receiver": ("tls", ["--tls-ca", certs["other"]]),
        "nobody-listening": ("", []),
    }[case]
    addr = long_lived[target][1] if target else f"tcp:127.0.0.1:{_free_port()}"
    for first in range(0, RUNS, BATCH):
        runs = [send(tmp_path, f"{case}{n}", addr, *extra) for n in range(first, first + BATCH)]
        for tx in runs:
            check_refused(tx, message)
    err = (tmp_path / f"{case}0.err").read_text()
    if case == "nobody-listening":
        assert "Connection refused (errno 111)" in err
    elif case == "untrusted-receiver":
        assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in err, err
    elif case == "tls-to-plain":
        # The plain receiver reset the TLS ClientHello it read as a bad handshake.
        assert "errno 104" in err or "tls" in err, err
    else:
        assert "(errno" in err or "tls" in err, err
