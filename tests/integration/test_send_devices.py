"""Device sources on the C send path (`vfiomig.send._threads`): a kernel VFIO device's data
fd read by a C reader thread (a ``fed`` `FakeVfioDevice`: its data fd a real socket a thread
feeds), vfiomig's own vfio-user server whose replies a C reader thread receives
(native/vfiomig_sendvu.c; its failures in test_send_vfio_user_native.py), and devices read
in Python and pushed to the job (a VFIO device read through the fake's injected ``read``, a
source whose reads are short). Each writes on every channel the bytes of the trio sender
(``VFIOMIG_SEND_THREADS=0``) and of the pure core; failures name the device, the cause and
how far it got, put the device back, and leave no thread behind."""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
import trio

from tests.integration.send_helpers import (
    IDSTR,
    Stream,
    UserDevice,
    hashes_of,
    run_send,
    send_threads,
)
from vfiomig import _core as core
from vfiomig.send import SendError
from vfiomig.sources import Source
from vfiomig.testing import FakeVfioDevice
from vfiomig.testing._fake_saving import SavingModel
from vfiomig.vfio import VfioSource
from vfiomig.vfio._uapi import VFIO_MIGRATION_P2P, VFIO_MIGRATION_STOP_COPY, MigState
from vfiomig.vfio_user import MigState as UserState

pytestmark = pytest.mark.skipif(
    getattr(core, "SendJob", None) is None, reason="the C send path needs the C core"
)

FLAGS = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P


class ShortReads(Source):
    """A device source whose reads return fewer bytes than asked, at its own whim: each
    read is a packet (it does not `fills_reads`), on either path."""

    description = "short-reads"

    def __init__(self, data: bytes, seed: int) -> None:
        self.data = data
        self.at = 0
        self.rng = random.Random(seed)

    async def read(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        n = min(max_bytes, self.rng.randrange(1, max_bytes + 1))
        chunk = self.data[self.at : self.at + n]
        self.at += len(chunk)
        return chunk


class FakeVfio:
    """A `VfioSource` over a `FakeVfioDevice` of ``size`` STOP_COPY bytes: ``fed`` (its
    data fd a real socket, read with os.read) or read through the fake's ``read``."""

    def __init__(self, size: int, *, fed: bool, **model: Any) -> None:
        self.fake = FakeVfioDevice(
            flags=FLAGS, saving=SavingModel(stop_copy=size, seed=3, fed=fed, **model)
        )
        read = os.read if fed else self.fake.read
        self.source = VfioSource.from_device_fd(
            self.fake.open(), owned=True, ioctl=self.fake.ioctl, read=read
        )

    async def __aenter__(self) -> VfioSource:
        return self.source

    async def __aexit__(self, *exc: object) -> None:
        await self.source.aclose()
        self.fake.close()


class Plain:
    def __init__(self, source: Source) -> None:
        self.source = source

    async def __aenter__(self) -> Source:
        return self.source

    async def __aexit__(self, *exc: object) -> None:
        await self.source.aclose()


DATA = random.Random(5).randbytes((3 << 20) + 4321)

#: name -> (the source's context, channels, packet size, the C path's mode)
CASES: dict[str, tuple[Callable[[], Any], int, int, str]] = {
    "vfio-fed-3ch-64k": (lambda: FakeVfio((2 << 20) + 99, fed=True), 3, 65536, "stream"),
    "vfio-fed-4ch-1000": (lambda: FakeVfio(300_007, fed=True), 4, 1000, "stream"),
    "vfio-fed-empty": (lambda: FakeVfio(0, fed=True), 2, 4096, "stream"),
    "vfio-read-3ch-64k": (lambda: FakeVfio((1 << 20) + 5, fed=False), 3, 65536, "push"),
    "vfio-read-2ch-short": (
        lambda: FakeVfio(500_000, fed=False, max_read=7000),
        2,
        4096,
        "push",
    ),
    "vfio-user-4ch-1m": (lambda: UserDevice(Stream(DATA, 1 << 20), 1 << 20), 4, 1 << 20, "stream"),
    "vfio-user-3ch-64k": (lambda: UserDevice(Stream(DATA, 1 << 20), 1 << 20), 3, 65536, "stream"),
    "vfio-user-3ch-3000": (
        lambda: UserDevice(Stream(DATA[:400_000], 5000), 5000),
        3,
        3000,
        "stream",
    ),
    "short-reads-3ch-4k": (lambda: Plain(ShortReads(DATA[:300_000], 1)), 3, 4096, "push"),
}


#: The sha256 of every channel as the trio sender writes each case (main's per-read path,
#: pure core and C core alike, `VFIOMIG_SEND_THREADS=0`): the C send path must match it.
GOLDEN: dict[str, list[str]] = {
    "vfio-fed-3ch-64k": [
        "7443a8dac6562462887817e9922eaee5ad6c9db5a4cb666e232642ec31c89682",
        "8470b31b365c61669eb49d67647af72114aae1069662d1dffac5dc83174287fa",
        "c33a77d63c02782cda889003ce40b81c45a8264dc40a2814b90488df140aeadc",
    ],
    "vfio-fed-4ch-1000": [
        "9c24d967568ee20c3c4f375c7ad16aa17d381f054c4c45e8a70eeb5827957454",
        "b8bdf1ab2680e9c6e6c7078b6b551853e280684780a52f3f29a4c7ff7ca6ac4f",
        "1a07e16d83c4332ad56a264e402956345e1321e4e4cb9e233f60285d6972ba91",
        "211609740242bbfb06f11c70f6960d51d5a63e5d86208d4d470ca5f643c6f345",
    ],
    "vfio-fed-empty": [
        "f5f8f2745ba4838861d02a1f1e5e2fdaebedce1aae462b442867435c4eafa364",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ],
    "vfio-read-3ch-64k": [
        "6754fe1a095ca991cda85ef5ddb812f6d501599cae7d190fae9cf6c0156f6636",
        "c9973c88006b474c33239e0472cd40dc92d84197f9ad2b39e78c190cdb0155a4",
        "9066509c3076453ef4b25d7c1f180bf03ae4b2cf585cb12c3588c96d9ea5cfc6",
    ],
    "vfio-read-2ch-short": [
        "2b308885594b00d7d84c0665c51c67187f1528a8e62fc83012b0fd9585467a1d",
        "dec8495a363ac60a44aaaec473494d6ddf1f2df1c5722e7825f08d7681aabb2d",
    ],
    "vfio-user-4ch-1m": [
        "72babb1e57c9985c4bd17ae7e21b15202a506a2972f9fff08ff0707602bb2336",
        "d31b5f7f3e3b0e5454b69b7f3416d6f63e688b21240d979d61be85350bd633a8",
        "9a557520957365ee80d5bc80e68bc330c6f20afcf34b7f1c02f4831297b81649",
        "0147e86e15b6f66660cd72910b3da40fdb2e768ab9d8a31baf6762bb2cb67234",
    ],
    "vfio-user-3ch-64k": [
        "bbd07b3b28852a19976aed8751078b842ac6a95b0e0e17f0ec47c190b172ff4a",
        "e7604da184c0e32359c7ee8f755f54268f598996beebe99cf4f94ef45b417d2b",
        "fa853d408aed0a70c884b8d55f940a7be4fdac04c5cdd1935a1b928b7515817e",
    ],
    "vfio-user-3ch-3000": [
        "f9cbc6ae83a7be94dd1506459e77c088e61b753fe8b18c3b3b0e0cc5e1aa11d3",
        "e661c30685e0f037c491b509b7ad996821bf682cd96875a6be5bd23d9d4c6cca",
        "eefe2e5c01aaba2f7268f237a4b317acc20eb04058fccd332ee4411cf319a85f",
    ],
    "short-reads-3ch-4k": [
        "142fc6e224a3caa958c7c030b76654084aa0a564c3337ee76fb0d5cfac582ba6",
        "0794a0aa715bc9a65166ce8c265c4aafc8358284d024250c7c99acb20c25d651",
        "7da8a32073400c34579bfe62281bddfe4c1ec0b02e58248adb695473a087ae39",
    ],
}


@pytest.mark.parametrize("name", CASES)
async def test_device_sources_write_the_trio_senders_bytes(name: str) -> None:
    make, channels, packet, mode = CASES[name]
    with trio.fail_after(60):
        threaded, modes = await hashes_of(make, channels, packet, "1")
        trio_sent, none = await hashes_of(make, channels, packet, "0")
    assert modes == [mode] and none == []
    assert trio_sent == GOLDEN[name]
    assert threaded == trio_sent


async def test_a_fed_device_read_error_names_the_byte_and_recovers_it() -> None:
    ctx = FakeVfio(3 << 20, fed=True, read_errno_at=(1_500_000, errno.EIO))
    endings: dict[int, str] = {}
    with trio.fail_after(30), pytest.raises(SendError) as info:
        async with ctx as source:
            await run_send(source, 2, endings=endings, packet_size=65536)
    text = str(info.value)
    assert text.startswith(f"{IDSTR}/0: reading source vfio:fd "), text
    assert "reading the data fd failed in STOP_COPY at byte 1500000" in text, text
    assert "Connection reset by peer" in text and "device back in RUNNING from STOP_COPY" in text
    assert "\n" not in text
    assert ctx.fake.state is MigState.RUNNING and ctx.fake.resets == 0
    assert endings == {0: "reset", 1: "reset"}, endings
    assert send_threads() == []


async def test_a_vfio_user_device_error_is_the_trio_senders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A MIG_DATA_READ that fails mid-stream: the same one line as the trio sender's
    (device, source, the read's offset, the server's errno), every channel reset, and the
    device back in RUNNING (the replies still owed drained, the client kept in step)."""
    seen = []
    for threads in ("1", "0"):
        monkeypatch.setenv("VFIOMIG_SEND_THREADS", threads)
        stream = Stream(DATA, 1 << 16, fail_at=1 << 20)
        endings: dict[int, str] = {}
        with trio.fail_after(30):
            async with UserDevice(stream, 1 << 16) as source:
                with pytest.raises(SendError) as info:
                    await run_send(source, 3, endings=endings, packet_size=65536)
                text = str(info.value).replace(source.path, "SOCK")
        assert endings == {0: "reset", 1: "reset", 2: "reset"}, endings
        assert send_threads() == []
        seen.append((text, stream.states))
    text = seen[0][0]
    assert text == (
        f"{IDSTR}/0: reading source vfio-user:SOCK failed: vfio-user SOCK: MIG_DATA_READ"
        " (65536 bytes at stream offset 1048576) failed with errno 5 (Input/output error)"
    ), text
    assert seen[1] == seen[0]
    assert seen[0][1][-1] == UserState.RUNNING, seen[0][1]


@pytest.mark.parametrize("kind", ["fed", "vfio-user"])
async def test_a_reset_channel_during_a_device_send_names_it(kind: str) -> None:
    ctx: Any = (
        FakeVfio(64 << 20, fed=True)
        if kind == "fed"
        else UserDevice(Stream(bytes(64 << 20), 1 << 20), 1 << 20)
    )
    endings: dict[int, str] = {}
    with trio.fail_after(60):
        async with ctx as source:
            with pytest.raises(SendError) as info:
                await run_send(source, 2, reset_after=300_000, endings=endings, packet_size=65536)
    text = str(info.value)
    assert text.startswith("channel 1: ") and "\n" not in text, text
    assert endings[0] == "reset", endings
    if kind == "fed":
        assert ctx.fake.state is MigState.RUNNING
    else:
        assert ctx.stream.states[-1] == UserState.RUNNING
    assert send_threads() == []


@pytest.mark.parametrize("kind", ["fed", "vfio-user"])
async def test_a_cancel_during_a_device_send_joins_every_thread(kind: str) -> None:
    """The receiver reads nothing: the channels' threads block in sendmsg, the reader (or
    the pushing task) waits for room; a cancel ends it all within a bound."""
    ctx: Any = (
        FakeVfio(256 << 20, fed=True)
        if kind == "fed"
        else UserDevice(Stream(bytes(64 << 20), 1 << 20), 1 << 20)
    )
    with trio.fail_after(60):
        async with ctx as source:
            with trio.move_on_after(0.5) as scope:
                await run_send(source, 2, read=False, packet_size=65536)
            start = trio.current_time()
        assert scope.cancelled_caught
        assert trio.current_time() - start < 10
    assert send_threads() == []
    if kind == "fed":
        assert ctx.fake.state is MigState.RUNNING
    else:
        assert ctx.stream.states[-1] == UserState.RUNNING


async def test_a_client_that_is_not_idle_is_read_and_pushed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that cannot hand its socket over once started keeps the Python reads
    (pushed to the job): the same bytes."""
    monkeypatch.setattr("vfiomig.vfio_user.VfioUserClient.native_read", lambda self: None)
    caplog.set_level(logging.INFO, logger="vfiomig")
    with trio.fail_after(60):
        hashes, modes = await hashes_of(
            lambda: UserDevice(Stream(DATA, 1 << 20), 1 << 20), 3, 65536, "1"
        )
    assert modes == ["stream"]  # chosen before start; the device was pushed after all
    assert "sent from C threads (read here, pushed)" in caplog.text
    assert hashes == GOLDEN["vfio-user-3ch-64k"]
