"""The sender's C send path (`vfiomig.send._threads`, the C core's `SendJob`) on loopback:
when it is chosen, and that each failure still ends the send with one line naming the
channel or the device and the cause, that a cancel stops its threads within a bound and
that no thread outlives the call (their names: ``vfm-send-N``, ``vfm-read-N``). The bytes
it writes are checked in test_send_wire.py, a whole migration in test_receive.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

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


@pytest.mark.parametrize("direct", ["1", "0"])
async def test_a_reset_channel_fails_the_send_naming_it(
    direct: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VFIOMIG_SEND_DIRECT", direct)
    endings: dict[int, str] = {}
    with trio.fail_after(30), pytest.raises(SendError) as info:
        await run_send(SynthSource(256 << 20, 1), reset_after=200_000, endings=endings)
    text = str(info.value)
    assert endings == {0: "reset", 1: "reset by us"}, "channel 0 must be reset, never ended"
    assert text.startswith("channel 1: ") and "\n" not in text
    assert "reset" in text or "Broken pipe" in text, text
    assert send_threads() == []


async def test_a_source_read_error_names_the_device_and_the_cause(tmp_path: Path) -> None:
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


@pytest.mark.parametrize("blocked", ["receiver", "receiver-direct", "pipe"])
async def test_a_cancel_stops_the_threads_promptly(
    blocked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads blocked in a send (the receiver reads nothing; channel threads fed by a
    reader, or making their own packets) or in a read (a pipe nobody writes) stop when
    the task is cancelled; none is left."""
    monkeypatch.setenv("VFIOMIG_SEND_DIRECT", "1" if blocked == "receiver-direct" else "0")
    rfd = wfd = -1
    if blocked == "pipe":
        rfd, wfd = os.pipe()
        source: object = FdSource(rfd, owned=True, description="pipe")
    else:
        source = SynthSource(1 << 30, 1)
    try:
        with trio.fail_after(30):
            with trio.move_on_after(0.5) as scope:
                await run_send(source, read=blocked == "pipe")
            start = trio.current_time()
        assert scope.cancelled_caught
        assert trio.current_time() - start < 5  # the join after the cancel is short
        assert send_threads() == []
    finally:
        if wfd >= 0:
            os.close(wfd)


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
