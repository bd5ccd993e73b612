"""The sender's bytes on the wire, channel by channel, against the sender before issue 23.

`GOLDEN` holds the sha256 of every channel's byte stream (after its handshake) as the
per-packet sender of main 894000e wrote them, for every order, odd and even packet sizes,
both header byte orders, paced and unpaced, from each kind of stream source. The batched
sender must write exactly the same bytes, with either core, and so must the C send path
(`vfiomig.send._threads`, chosen for round robin, unpaced, from synth, file and pipe
sources): each case runs with the pure core, the C core's trio sender
(``VFIOMIG_SEND_THREADS=0``), the C core as chosen (synth: each channel's thread makes its
own packets), the C core with a reader thread (``VFIOMIG_SEND_DIRECT=0``), and with its
zero-copy sends (sendfile from a file, splice from a pipe: native/vfiomig_sendzc.c) never
and at every packet size; a case checks which sender carried it and that the zero-copy
sends carried its data where they should. A pipe carries the bytes of the file case of
the same size, so it has that case's digests.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import vfiomig._core as core_module
import vfiomig.send._channel as channel_module
import vfiomig.send._sender as sender_module
import vfiomig.send._threads as threads_module
from vfiomig._core._wire import HANDSHAKE_SIZE
from vfiomig.send import SendDevice, send_migration
from vfiomig.sources import SynthSource
from vfiomig.sources._simple import FdSource, open_file_source

UUID = bytes(range(16))
IDSTR = "0000:00:04.0/vfio"

#: name -> (source, size, packet_size, channels, order, extra send_migration arguments)
CASES: dict[str, tuple[str, int, int, int, str, dict[str, Any]]] = {
    "rr-1ch-4k": ("synth", 300_000, 4096, 1, "roundrobin", {}),
    "rr-3ch-1000": ("synth", 300_123, 1000, 3, "roundrobin", {}),
    "rr-4ch-64k": ("synth", (1 << 20) + 77, 65536, 4, "roundrobin", {}),
    "rr-4ch-1m": ("synth", 3 << 20, 1 << 20, 4, "roundrobin", {}),
    "rr-3ch-host": ("synth", 200_000, 3000, 3, "roundrobin", {"endian": "host"}),
    "random-3ch-1000": ("synth", 200_001, 1000, 3, "random", {"seed": 7}),
    "random-4ch-64k": ("synth", 1 << 20, 65536, 4, "random", {"seed": 3}),
    "shuffle-3ch-1000": ("synth", 200_001, 1000, 3, "shuffle", {"seed": 5, "window": 5}),
    "shuffle-2ch-4k": ("synth", 300_000, 4096, 2, "shuffle", {"seed": 1}),
    "idx0last-3ch-1000": ("synth", 200_001, 1000, 3, "idx0-last", {}),
    "idx0last-2ch-64k": ("synth", 1 << 20, 65536, 2, "idx0-last", {}),
    "paced-3ch-4k": ("synth", 200_000, 4096, 3, "roundrobin", {"channel_rate": 50e6}),
    "linkpaced-2ch-4k": ("synth", 200_000, 4096, 2, "random", {"link_rate": 50e6, "seed": 2}),
    "file-3ch-1000": ("file", 150_007, 1000, 3, "roundrobin", {}),
    "file-4ch-64k": ("file", (1 << 20) + 5, 65536, 4, "roundrobin", {}),
    "file-2ch-shuffle": ("file", 100_000, 3000, 2, "shuffle", {"seed": 9, "window": 4}),
    "empty-2ch": ("synth", 0, 4096, 2, "roundrobin", {}),
    "pipe-4ch-64k": ("pipe", (1 << 20) + 5, 65536, 4, "roundrobin", {}),
    "pipe-3ch-1000": ("pipe", 150_007, 1000, 3, "roundrobin", {}),
    # the zero-copy sends (native/vfiomig_sendzc.c): sendfile from 64 KiB packets of a
    # file, splice from 128 KiB of a pipe (VFIOMIG_SEND_ZEROCOPY=2: at every size), odd
    # sizes, sources that are and are not whole packets, one and several channels, unix
    # socket channels
    "file-1ch-1m": ("file", (3 << 20) + 12_345, 1 << 20, 1, "roundrobin", {}),
    "file-4ch-1m": ("file", 4 << 20, 1 << 20, 4, "roundrobin", {}),
    "file-2ch-100k": ("file", (2 << 20) + 3, 100_000, 2, "roundrobin", {}),
    "file-4ch-4k": ("file", 300_001, 4096, 4, "roundrobin", {}),
    "file-3ch-64k-unix": ("file", (1 << 20) + 5, 65536, 3, "roundrobin", {"unix": True}),
    "pipe-1ch-1m": ("pipe", (3 << 20) + 12_345, 1 << 20, 1, "roundrobin", {}),
    "pipe-4ch-1m": ("pipe", 4 << 20, 1 << 20, 4, "roundrobin", {}),
    "pipe-2ch-100k": ("pipe", (2 << 20) + 3, 100_000, 2, "roundrobin", {}),
    "pipe-3ch-128k": ("pipe", 6 * 131_072, 131_072, 3, "roundrobin", {}),
    "pipe-4ch-4k": ("pipe", 300_001, 4096, 4, "roundrobin", {}),
    "pipe-3ch-64k-unix": ("pipe", (1 << 20) + 5, 65536, 3, "roundrobin", {"unix": True}),
}


def file_state(size: int) -> bytes:
    return np.random.default_rng(size).bytes(size)


async def capture(
    tmp: Path,
    source: str,
    size: int,
    packet: int,
    channels: int,
    order: str,
    unix: bool = False,
    **extra: Any,
) -> list[str]:
    """Send one device over ``channels`` loopback channels (TCP, or a unix socket); the
    sha256 of each channel's bytes after its handshake, by channel id."""
    streams: dict[int, hashlib._Hash] = {}
    if unix:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(tmp / "channels.sock"))
        sock.listen(channels)
        listener = trio.SocketListener(sock)
        address = f"unix:{tmp / 'channels.sock'}"
    else:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        address = f"tcp:127.0.0.1:{listener.socket.getsockname()[1]}"

    async def drain(stream: trio.SocketStream) -> None:
        async with stream:
            hello = b""
            while len(hello) < HANDSHAKE_SIZE:
                chunk = await stream.receive_some(HANDSHAKE_SIZE - len(hello))
                assert chunk
                hello += chunk
            h = streams.setdefault(hello[24], hashlib.sha256())
            while chunk := await stream.receive_some(1 << 20):
                h.update(chunk)

    writer: Callable[[], None] | None = None
    if source == "synth":
        src: Any = SynthSource(size, seed=11)
    elif source == "pipe":  # fed by a thread, in writes of odd sizes
        rfd, wfd = os.pipe()
        src = FdSource(rfd, owned=True, description="pipe")
        data = file_state(size)

        def feed() -> None:
            with os.fdopen(wfd, "wb", buffering=0) as f:
                for i in range(0, len(data), 77_777):
                    f.write(data[i : i + 77_777])

        writer = feed
    else:
        path = tmp / "state"
        path.write_bytes(file_state(size))
        src = open_file_source(str(path))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, listener, channels, drain, nursery)
            if writer is not None:
                nursery.start_soon(trio.to_thread.run_sync, writer)
            await send_migration(
                connect_to=[address],
                channels=channels,
                uuid=UUID,
                devices=[SendDevice(IDSTR, 2, src)],
                packet_size=packet,
                order=order,
                **extra,
            )
        await listener.aclose()
    return [streams[i].hexdigest() for i in range(channels)]


async def _accept(listener: trio.SocketListener, n: int, drain: Any, nursery: trio.Nursery) -> None:
    for _ in range(n):
        nursery.start_soon(drain, await listener.accept())


def _golden_now(tmp: Path) -> dict[str, list[str]]:
    """Today's digests for every case (how `GOLDEN` was made)."""
    digests = {}
    for name, case in CASES.items():
        digests[name] = trio.run(functools.partial(capture, tmp, *case[:5], **case[5]))
    return digests


GOLDEN: dict[str, list[str]] = {
    "rr-1ch-4k": [
        "c9ffffc726f8ddea81a472a9a0642a2c636c3943e24752074a2a18a54746e9a9",
    ],
    "rr-3ch-1000": [
        "7b00cb821507f63d77a2302d1abcb143cfe51faf96b9c09205b8708a7b051ecf",
        "f1042de29a9707312e5f353cba884c94a84d4d65e7357e07473f4c38bc19f1d2",
        "434600617e54766f9252fc5d6b785b971bd17c5d7e55417bb5c8e12703c9a1ab",
    ],
    "rr-4ch-64k": [
        "1a82c348bbfc85bbb59562b64ebe8e22a1cc95fa1388162ce9f7bd20f2960390",
        "60276880a480d8c540fa71a319e476e188c17f5ab6402d7677d117fcd3e9df0e",
        "819ac76e6cf85517a215d0fe9ec6fefd33381be2e95845dfea7d11cb9be7a742",
        "c5e4323a2fa98440d33cd3bb542bc2412e43fc41dc05522e5c7721f1f24419fe",
    ],
    "rr-4ch-1m": [
        "7da61bac0522c2b0da95214075ff62603de3cfc2d012265a321e8c53ae7a953d",
        "4eb4f680394cecb74d1a5434b73d44c26486da67fd3e8dbd5d654e3660dad885",
        "e611557c81de011e2db7a125d6ef444b189a619520f721cf2301cc1cb478888f",
        "b2c33a54b7b8c21228b1b89bd5fda8b1a6f469c0fa6fa93b4ec6966bf0bbc23b",
    ],
    "rr-3ch-host": [
        "3bafbda520ad158abc84cd82eb179626cb2446332f89f7033a01abd780c9f359",
        "113d25243c9bce7fdaeb0b756752cf9565270d46543186a7d5129883b36143a1",
        "7df8dd62139e434be3737301ee28aaefd74d90072810512f1b47513b50da85e4",
    ],
    "random-3ch-1000": [
        "1ddc74abdc1650c62c079963a9636158ff8bea952a476554e0b30918ccda9e32",
        "37b6542a90e20259f2b9d80dc9ce7640ea9d5586e6e4d758584a0afc43c636f8",
        "a789a6c33d8635c4ad339614ec92688fc272a34372bcb238aed6101b2195ae6a",
    ],
    "random-4ch-64k": [
        "c9baa6548f1d6deb6d4f0fbe7439f69e203e222f26cd962093016a8650ff990b",
        "f9f215dd84bc781894ac8fa4b550a96e9549a96cfc5ee7afb3f460716bf69baa",
        "df509391617c72a37d67cb536f09d934164323157c183f696901d51a171828ad",
        "42c091738162bc84e7385a533eaf4a79d34d5c63f2712760048d7d3ab44d129f",
    ],
    "shuffle-3ch-1000": [
        "23ae5481804deced1c37cf3692e6d08d2803f3e21df1fdf3c02bba2312b76dad",
        "48de718064e870d765ea87e31532aff9d92a74211b30f6d1671b4ed13e9ddf92",
        "7141d529b5df979fefa5a0b6ea991344d784c5a6c071bc2956ef8cf42fda5738",
    ],
    "shuffle-2ch-4k": [
        "b016da9887a345247b13b77c13041b8b99fac98b8299bb626079a1601d20307a",
        "0764da3d0de0aff2ad098f38da92dd8dd249b70782e009f13ead08613bfd0e83",
    ],
    "idx0last-3ch-1000": [
        "8e87e2c03c50150040677b58543ea469e26dd1613db419a7b189576d1b6809d7",
        "6eb56e586a0ff110e16300c0cacea23ddc55a65808ddaa1844bf978b4b8ca7e6",
        "77932a90c6656f2967cf7681336b5f31b56d0c9172968287b0db1e6083ea786b",
    ],
    "idx0last-2ch-64k": [
        "8e8a8f4cd400758c39ba9947e8a5890d4231f4fb10b654c8567a8549e60fc6bd",
        "eeefbbdd89edb5911c6b0be9b1f65277535e6de9b2d673a306ed8db4a89e7cb6",
    ],
    "paced-3ch-4k": [
        "6b3dc4b35a2684702dfc3d292f0a83e71b13c6860d41fbb2ed8580fb437af27c",
        "a4f0d267b7c9b0a2ede1bb99b56328a101c98f97261a7925e880c2f40053a35b",
        "ddf576d1c460bb69ae5c126859bc6ef6b9ed639c3fd68496c4480601bdf8d939",
    ],
    "linkpaced-2ch-4k": [
        "edce064f759d9cbfa6bdfc2bb3efd31088eb512f5d6f26d24e219d6c694339cf",
        "a7877a74680f7d59cbe79a6e6776733070bd354fb12068ce066121dd9497081c",
    ],
    "file-3ch-1000": [
        "beadcdaf74891d99661fe3bb2c2b7a1141bbbe3ca0e1cfb0ceef069a8468cd25",
        "e548553bd82d4dfa303168961dd702d8abf8a8d0b039b3c30ff916cfe6660407",
        "a6a2ca8aa06097241be7c4811dfcc5e8294dd0b85828cdf66cb946bbd1863b78",
    ],
    "file-4ch-64k": [
        "9d2a5d68900e5251b22f4ff91ddd5a88edca49776d80368ff8969f72ef571d21",
        "1460414b46cc0e82d5717b06a1134cb96de790d26e7020ddbe795b726dcf5079",
        "0180af7cb0d23cb9ee2ae52fb062603719d2a14c18b3dcfc49ab8f7b34bbebe2",
        "af70d01068e31cf427540f1c84074fbaecd46429afe2a65e6a9e1041eb637c70",
    ],
    "file-2ch-shuffle": [
        "219ad3da8df1f5e0f0550d647e495a2a9b336635e8708a1cbc1b0746da1d64f6",
        "1ba6f08723bd05f2c15b6ca72eab2c69cdba6429e3626c1b39f368e67077073c",
    ],
    "empty-2ch": [
        "097a303b5cb3be7ca2e632376c1bd04c7e65f9550e56d4f2fbe9744475e60e02",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ],
    # made with the trio sender (VFIOMIG_SEND_THREADS=0), which writes the bytes above
    "file-1ch-1m": [
        "d8eb7da57209eb53803b072593a3f4a0d4b24128ea14a462f253fb3153040dec",
    ],
    "file-4ch-1m": [
        "338630d957f91441b8bef2ee6e955630e31c2e18ea9dd1910330e8adeb9a7d48",
        "4440141b6547094466da238162b85e73b610a81a363a3d1ec3173de447c3d6d9",
        "1ca13aee80f1e535ac73b8f562a7941c5f60d6e8700242f239d5f9d350305fbc",
        "96aa57b2a59dca5ce182a84e9ece63203b99d341e77d504d002dbdf9f9c29926",
    ],
    "file-2ch-100k": [
        "f818ce5042a226fe0ae088bc5434038aba845a7a4473128475c5ca12a779569a",
        "f1e331a430aa2d2ebfaa5ec9e0aabee43687c6934d1a2dcd9cf62bcd83a7ee62",
    ],
    "file-4ch-4k": [
        "affd27958bbb01bd761d3d3c4ba69da7bce809a90c6733fae80d1dd8b98e30d7",
        "c617d90cc7dee22cc9a88628b103ea63c098b88d0e68225b5221a61f4c28e750",
        "9c389d1f3dfd709c8b74527715447479b76910057180776945e1c16a41a6517b",
        "20c1a4b585fae81ae95492e48dfead407f7d1e8ed031191aa7ddf24a2da4e1ba",
    ],
    "file-3ch-64k-unix": [
        "c9cc0bd15a8f1894f2f8f52e757527ca684010c416f034325482e680c124b876",
        "edfa3d940404f83231b26cc9390805aefa07f41f594320e4c989512a8a9ec2ab",
        "d44289f4661fa8047ec64d626a95aeaa40cbb551e6240eee85818a42474d016b",
    ],
    "pipe-3ch-128k": [
        "431af7c0e62160f440b7a66cb6145260460cc9192cdf46c8471484e6d68303ad",
        "ec1f4c451f8634207ecebebcaebe005b4f39ef194c84f111a51b614643fd0883",
        "5f1d9c456a8a71aab0915e405af7f739efb7d44dabb1e3fc87e6c4c349f657c7",
    ],
}


for _name in [n for n in CASES if n.startswith("pipe-") and n not in GOLDEN]:
    GOLDEN[_name] = GOLDEN["file-" + _name.removeprefix("pipe-")]

SENDERS = sorted(core_module.IMPLEMENTATIONS) + (
    ["native-trio", "native-reader", "native-copy", "native-zc"]
    if "native" in core_module.IMPLEMENTATIONS
    else []
)
#: The C send path's jobs made in a test (`sender_core` records them).
JOBS: list[Any] = []


@pytest.fixture(params=SENDERS)
def sender_core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sender with each core (its outboxes, headers and buffers; the C send path's
    `SendJob`, which the pure core has not), the C core's trio sender, the C send path
    with a reader thread for synth (``native-reader``), and with its zero-copy sends where
    they pay (``native``), never (``native-copy``) and at every packet size
    (``native-zc``)."""
    name = str(request.param)
    if name == "native-trio":
        monkeypatch.setenv("VFIOMIG_SEND_THREADS", "0")
    if name == "native-reader":  # synth through the reader thread, not made by the channels
        monkeypatch.setenv("VFIOMIG_SEND_DIRECT", "0")
    if name in ("native-copy", "native-zc"):
        monkeypatch.setenv("VFIOMIG_SEND_ZEROCOPY", "0" if name == "native-copy" else "2")
    impl = core_module.IMPLEMENTATIONS[name.split("-")[0]]
    monkeypatch.setattr(sender_module, "core", impl)
    monkeypatch.setattr(channel_module, "core", impl)
    # `SendJob` is not in a core's namespace (IMPLEMENTATIONS): the C send path takes it
    # from vfiomig._core itself, None with the pure core
    monkeypatch.setattr(threads_module, "core", impl if name == "python" else core_module)
    JOBS.clear()
    real = getattr(core_module, "SendJob", None)
    if real is not None:

        def recorded(*args: Any, **kwargs: Any) -> Any:
            JOBS.append(real(*args, **kwargs))
            return JOBS[-1]

        monkeypatch.setattr(core_module, "SendJob", recorded)
    return name


def zero_copy_expected(name: str, sender: str) -> bool | None:
    """Whether the case's data must go (at least partly) by sendfile or splice: True,
    False (none of it), None (either: a 1 MiB packet may not fit in a channel's pipe,
    which holds 1 MiB in pages, after the source's writes left a partial page)."""
    source, _, packet, _, order, extra = CASES[name]
    if sender not in ("native", "native-reader", "native-zc") or source not in ("file", "pipe"):
        return False
    if order != "roundrobin" or "link_rate" in extra:
        return False  # the trio sender's
    if source == "pipe" and packet >= 1 << 20:
        return None
    if sender == "native-zc":
        return True
    return packet >= (64 << 10 if source == "file" else 128 << 10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_wire_bytes_unchanged(name: str, tmp_path: Path, sender_core: str) -> None:
    source, size, packet, channels, order, extra = CASES[name]
    got = trio.run(lambda: capture(tmp_path, source, size, packet, channels, order, **extra))
    assert got == GOLDEN[name]
    zero_copy = sum(job.zerocopy_bytes for job in JOBS)
    expected = zero_copy_expected(name, sender_core)
    threads = sender_core in ("native", "native-reader", "native-copy", "native-zc")
    if threads and order == "roundrobin" and "link_rate" not in extra:
        assert JOBS, "the C send path must carry this case"
    else:
        assert not JOBS, "the trio sender must carry this case"
    if expected is not None:
        assert (zero_copy > 0) == expected, (zero_copy, expected, JOBS)


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(_golden_now(Path(d)), indent=4))
    os._exit(0)
