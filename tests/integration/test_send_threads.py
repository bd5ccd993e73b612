"""The sender's C send path (`vfiomig.send._threads`, the C core's `SendJob`) on loopback:
when it is chosen, and that each failure still ends the send with one line naming the
channel or the device and the cause, that a cancel stops its threads within a bound and
that no thread outlives the call (their names: ``vfm-send-N``, ``vfm-read-N``). The bytes
it writes are checked in test_send_wire.py, a whole migration in test_receive.py."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.faults import Snapshot
from tests.integration.send_helpers import IDSTR, run_send, send_threads
from vfiomig import _core as core
from vfiomig.bench._sendproc import PatternSource
from vfiomig.send import SendDevice, SendError
from vfiomig.send._types import SourceFailed
from vfiomig.sources import SynthSource
from vfiomig.sources._simple import FdSource

pytestmark = pytest.mark.skipif(
    getattr(core, "SendJob", None) is None, reason="the C send path needs the C core"
)


async def test_synth_file_and_pipe_sources_take_the_threads(tmp_path: Path) -> None:
    import vfiomig.send._sender as sender_module
    from vfiomig.send._threads import native_streams

    chosen: list[bool] = []
    real = native_streams

    def spy(*args: object, **kwargs: object) -> object:
        streams = real(*args, **kwargs)  # type: ignore[arg-type]
        chosen.append(streams is not None)
        return streams

    path = tmp_path / "state"
    path.write_bytes(os.urandom(300_000))
    rfd, wfd = os.pipe()
    os.write(wfd, os.urandom(50_000))
    os.close(wfd)
    sources = [
        SynthSource(1_000_000, 2),
        FdSource(os.open(path, os.O_RDONLY), owned=True, description="file"),
        FdSource(rfd, owned=True, description="pipe"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sender_module, "native_streams", spy)
        with trio.fail_after(30):
            for source in sources:
                await run_send(source)
    assert chosen == [True, True, True]
    assert send_threads() == []


@pytest.mark.parametrize(
    ("kind", "block", "packet"),
    [
        ("pattern", 4096, 4096),
        ("pattern", 7000, 3000),
        ("synth", 0, 1001),
        ("synth", 0, 5),
        ("synth", 0, 300_001),  # cut in pieces by a direct channel's 256 KiB scratch
    ],
)
async def test_sources_write_the_trio_senders_bytes(
    kind: str, block: int, packet: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench's pattern source (packets pointing into one tiled chunk, whatever the block)
    and synthetic state cut at offsets that are not whole words (made word by word
    otherwise): the bytes of the trio sender, from the C path's channel threads making
    their own packets (direct) and with a reader thread queuing them."""
    got = []
    for threads, direct in (("1", "1"), ("1", "0"), ("0", "1")):
        monkeypatch.setenv("VFIOMIG_SEND_THREADS", threads)
        monkeypatch.setenv("VFIOMIG_SEND_DIRECT", direct)
        hashes: dict[int, Any] = {}
        size = (1 << 20) + 123 if packet < 100 else (3 << 20) + 123
        source = PatternSource(size, block, 5) if kind == "pattern" else SynthSource(size, 9)
        with trio.fail_after(60):
            await run_send(source, 3, hashes=hashes, packet_size=packet)
        got.append([hashes[i].hexdigest() for i in range(3)])
    assert got[0] == got[1] == got[2]


def record_jobs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The `SendJob`s made from now on (to ask how much went by sendfile or splice)."""
    jobs: list[Any] = []
    real = core.SendJob

    def recorded(*args: Any, **kwargs: Any) -> Any:
        jobs.append(real(*args, **kwargs))
        return jobs[-1]

    monkeypatch.setattr(core, "SendJob", recorded)
    return jobs


def endless_pipe() -> tuple[FdSource, threading.Thread]:
    """A pipe source a thread writes into until its reader is closed."""
    rfd, wfd = os.pipe()

    def feed() -> None:
        block = bytes(range(256)) * 1024
        with os.fdopen(wfd, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(block)
            except BrokenPipeError:
                pass

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return FdSource(rfd, owned=True, description="pipe"), thread


def sparse_file(path: Path, size: int) -> FdSource:
    with path.open("wb") as f:
        f.truncate(size)  # reads as zeros, takes no room
    return FdSource(os.open(path, os.O_RDONLY), owned=True, description="file")


@pytest.mark.parametrize(
    ("kind", "direct"), [("synth", "1"), ("synth", "0"), ("file", "0"), ("pipe", "0")]
)
async def test_a_reset_channel_fails_the_send_naming_it(
    kind: str, direct: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the channel's thread is in a sendmsg (its own packets, or a reader's), a
    sendfile (file) or a splice (pipe; 256 KiB packets: both zero-copy) when its peer
    resets it."""
    monkeypatch.setenv("VFIOMIG_SEND_DIRECT", direct)
    snapshot = Snapshot.take()
    jobs = record_jobs(monkeypatch)
    feeder = None
    source: object
    if kind == "pipe":
        source, feeder = endless_pipe()
    elif kind == "file":
        source = sparse_file(tmp_path / "state", 256 << 20)
    else:
        source = SynthSource(256 << 20, 1)
    endings: dict[int, str] = {}
    with trio.fail_after(30), pytest.raises(SendError) as info:
        await run_send(source, reset_after=200_000, endings=endings, packet_size=256 << 10)
    text = str(info.value)
    assert endings == {0: "reset", 1: "reset by us"}, "channel 0 must be reset, never ended"
    assert text.startswith("channel 1: ") and "\n" not in text
    assert "reset" in text or "Broken pipe" in text, text
    assert send_threads() == []
    assert (jobs[0].zerocopy_bytes > 0) == (kind != "synth")
    if feeder is not None:
        feeder.join(10)  # the source's end closed: the writer saw EPIPE
        assert not feeder.is_alive()
    del jobs[:], info  # what holds the job (its eventfds)
    snapshot.check()  # the channels' pipes, the sockets, the source


@pytest.mark.parametrize("packet", [1 << 20, 4096])
async def test_a_file_that_shrinks_while_sent_fails_naming_the_device(
    packet: int, tmp_path: Path
) -> None:
    """sendfile (1 MiB packets) or a read (4 KiB) meets the end of a file truncated
    mid-send: the device's one-line error, never bytes that are not the file's (a
    mapped file faulted: SIGBUS)."""
    snapshot = Snapshot.take()
    path = tmp_path / "state"
    source = sparse_file(path, 256 << 20)
    endings: dict[int, str] = {}
    with trio.fail_after(30), pytest.raises(SourceFailed) as info:
        await run_send(
            source,
            endings=endings,
            packet_size=packet,
            after=(1 << 20, lambda: os.truncate(path, 3 << 20)),
        )
    text = str(info.value)
    assert text.startswith(f"{IDSTR}/0: reading source file failed: the file ended at byte ")
    assert text.endswith(", shorter than when the send began") and "\n" not in text, text
    assert endings == {0: "reset", 1: "reset"}, endings
    assert send_threads() == []
    del info  # its traceback holds the job
    snapshot.check()


def tcp_pair() -> tuple[int, int]:
    """Both ends of a loopback TCP connection, blocking: (reading end, writing end)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        writer = socket.create_connection(server.getsockname())
        reader, _ = server.accept()
    return reader.detach(), writer.detach()


@pytest.mark.parametrize("kind", ["pipe", "tcp"])
@pytest.mark.parametrize("zerocopy", ["0", "2"])
async def test_a_stream_whose_writer_dies_mid_packet_ends_with_a_short_packet(
    kind: str, zerocopy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer process killed mid-stream (mid-packet) is the source's end: the send
    succeeds with the bytes written, the last packet short, the bytes on every channel
    those of the trio sender; spliced (VFIOMIG_SEND_ZEROCOPY=2) or read, from a pipe or
    a blocking TCP socket."""
    code = (
        "import os, signal, sys\n"
        "block = bytes(range(256)) * 4099\n"
        "for _ in range(5): os.write(1, block)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    got = []
    for threads in ("1", "0"):
        monkeypatch.setenv("VFIOMIG_SEND_THREADS", threads)
        monkeypatch.setenv("VFIOMIG_SEND_ZEROCOPY", zerocopy)
        jobs = record_jobs(monkeypatch)
        rfd, wfd = os.pipe() if kind == "pipe" else tcp_pair()
        writer = await trio.lowlevel.open_process([sys.executable, "-c", code], stdout=wfd)
        os.close(wfd)
        hashes: dict[int, Any] = {}
        try:
            with trio.fail_after(60):
                await run_send(
                    FdSource(rfd, owned=True, description=kind),
                    3,
                    hashes=hashes,
                    packet_size=131_072,
                )
        finally:
            with trio.fail_after(30):
                assert await writer.wait() == -signal.SIGKILL
        got.append([hashes[i].hexdigest() for i in range(3)])
        if threads == "1":
            assert (jobs[0].zerocopy_bytes > 0) == (zerocopy == "2")
    assert got[0] == got[1]
    assert send_threads() == []


@pytest.mark.parametrize("zerocopy", ["1", "2"])
async def test_a_source_read_error_names_the_device_and_the_cause(
    zerocopy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read (packets below the splice threshold) or refused by splice (EINVAL, at every
    size: VFIOMIG_SEND_ZEROCOPY=2) and read then: the read's error."""
    monkeypatch.setenv("VFIOMIG_SEND_ZEROCOPY", zerocopy)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # read(2): EISDIR
    source = FdSource(fd, owned=True, description=f"fd:{fd}")
    endings: dict[int, str] = {}
    with trio.fail_after(30), pytest.raises(SourceFailed) as info:
        await run_send(source, endings=endings)
    assert endings == {0: "reset", 1: "reset"}, endings
    text = str(info.value)
    assert text.startswith(
        f"{IDSTR}/0: reading source fd:{fd} failed: Is a directory (errno 21)"
    ), text
    assert send_threads() == []


@pytest.mark.parametrize(
    "blocked",
    [
        "receiver",
        "receiver-direct",
        "pipe",
        "receiver-sendfile",
        "receiver-splice",
        "pipe-splice",
        "tcp-splice",
    ],
)
async def test_a_cancel_stops_the_threads_promptly(
    blocked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads blocked in a send (the receiver reads nothing: in sendmsg, channel threads
    fed by a reader or making their own packets; in sendfile or a splice into the socket)
    or in a read (a pipe nobody writes: read, or a splice into a channel's pipe) stop when
    the task is cancelled; none is left."""
    monkeypatch.setenv("VFIOMIG_SEND_DIRECT", "1" if blocked == "receiver-direct" else "0")
    rfd = wfd = -1
    feeder = None
    if blocked in ("pipe", "pipe-splice", "tcp-splice"):  # nobody writes
        rfd, wfd = os.pipe() if blocked != "tcp-splice" else tcp_pair()
        source: object = FdSource(rfd, owned=True, description="pipe")
    elif blocked == "receiver-sendfile":
        source = sparse_file(tmp_path / "state", 1 << 30)
    elif blocked == "receiver-splice":
        source, feeder = endless_pipe()
    else:
        source = SynthSource(1 << 30, 1)
    packet = 65536 if blocked in ("receiver", "pipe") else 256 << 10
    try:
        with trio.fail_after(30):
            with trio.move_on_after(0.5) as scope:
                await run_send(source, read=blocked.startswith(("pipe", "tcp")), packet_size=packet)
            start = trio.current_time()
        assert scope.cancelled_caught
        assert trio.current_time() - start < 5  # the join after the cancel is short
        assert send_threads() == []
    finally:
        if wfd >= 0:
            os.close(wfd)
    if feeder is not None:
        feeder.join(10)
        assert not feeder.is_alive()


def test_the_trio_sender_stays_for_what_the_threads_do_not_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vfiomig.send._threads import native_streams

    class Plain:
        sock = object()

    dev = [SendDevice(IDSTR, 0, SynthSource(10, 0))]
    writers = [Plain()]
    assert native_streams(dev, writers, order="roundrobin", linked=False, tls=False)  # type: ignore[arg-type]
    for order, linked, tls in [("random", False, False), ("roundrobin", True, False),
                               ("roundrobin", False, True), ("idx0-last", False, False)]:  # fmt: skip
        assert native_streams(dev, writers, order=order, linked=linked, tls=tls) is None  # type: ignore[arg-type]

    class Tls:
        sock = None

    assert native_streams(dev, [Tls()], order="roundrobin", linked=False, tls=False) is None  # type: ignore[list-item]
    monkeypatch.setenv("VFIOMIG_SEND_THREADS", "0")
    assert native_streams(dev, writers, order="roundrobin", linked=False, tls=False) is None  # type: ignore[arg-type]
