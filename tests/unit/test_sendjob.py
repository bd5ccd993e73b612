"""The C core's SendJob on its own: what it refuses, and one small job over a socket pair
(its counters, its done descriptor, its threads joined)."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from typing import Any

import pytest

from vfiomig import _core as core
from vfiomig._core._wire import VFIO_FLAG_CONFIG_STATE
from vfiomig.sources._simple import SYNTH_BLOCK, _base

pytestmark = pytest.mark.skipif(
    getattr(core, "SendJob", None) is None, reason="SendJob is the C core's"
)


def device(
    source: tuple[object, ...], config: bytes = b"CFG"
) -> tuple[str, int, str, tuple[object, ...], bytes]:
    return ("dev", 3, "be", source, config)


def test_bad_arguments_are_refused() -> None:
    job_type = core.SendJob
    assert job_type is not None
    a, b = socket.socketpair()
    with a, b:
        fd = a.fileno()
        with pytest.raises(ValueError, match="unknown source kind"):
            job_type([fd], 4096, 4096, 0, [device(("tape", 1))])
        with pytest.raises(ValueError, match="one block"):
            job_type([fd], 4096, 4096, 0, [device(("synth", 10, 0, b"short"))])
        with pytest.raises(ValueError, match="non-empty block"):
            job_type([fd], 4096, 4096, 0, [device(("pattern", 10, b""))])
        with pytest.raises(ValueError, match="header fields"):
            job_type([fd], 4096, 4096, 0, [("x" * 256, 0, "be", ("fd", 0, False), b"")])
        with pytest.raises(ValueError):
            job_type([fd], 4096, 1024, 0, [device(("fd", 0, False))])  # chunk < packet
        with pytest.raises(ValueError):
            job_type([], 4096, 4096, 0, [device(("fd", 0, False))])  # no channel
        job = job_type([fd], 4096, 4096, 0, [device(("fd", 0, False))])
        del job  # never started: nothing to join


@pytest.mark.parametrize("direct", [True, False])
def test_a_small_job_over_a_socket_pair(direct: bool) -> None:
    """Synthetic state of 10,000 bytes in packets of 4096 on one channel: three data
    packets and the config packet, then the done descriptor is readable; the same from
    the channel's thread alone (direct) and fed by a reader thread."""
    assert core.SendJob is not None
    a, b = socket.socketpair()
    with a, b:
        base = _base(4)
        assert base.nbytes == SYNTH_BLOCK
        job = core.SendJob(
            [a.fileno()], 4096, 8192, 1 << 20, [device(("synth", 10_000, 4, base))], direct=direct
        )
        assert job.direct is direct
        job.start()
        with pytest.raises(RuntimeError):
            job.start()
        assert select.select([job], [], [], 30)[0] == [job]
        job.join()
        assert job.finished and job.error is None
        assert job.device_counts == ((10_000, 4),)
        wire = 4 * core.PACKET_HEADER_SIZE + 10_000 + 3
        assert job.channel_bytes == (wire,)
        data = b""
        while len(data) < wire:
            data += b.recv(wire - len(data))
        headers = []
        off = 0
        for _ in range(4):
            # next_packet_size (VFIO header + data) at 272; the VFIO header's idx, flags
            size, _, idx, flags = struct.unpack_from(">IIII", data, off + 272)
            headers.append((idx, flags, size - 12))
            off += core.PACKET_HEADER_SIZE + size - 12
        assert headers == [(0, 0, 4096), (1, 0, 4096), (2, 0, 1808), (3, VFIO_FLAG_CONFIG_STATE, 3)]
        assert data[-3:] == b"CFG"


def test_direct_only_where_no_reader_is_needed() -> None:
    """Without a reader the channels' threads must know every packet by its offset: one
    synth or pattern device, chunks of whole packets. A descriptor (read in order), two
    devices (their packets interleave as their readers go) or chunks that cut packets
    keep the reader."""
    assert core.SendJob is not None
    a, b = socket.socketpair()
    with a, b:
        fd = a.fileno()
        synth = device(("synth", 10_000, 4, _base(4)))
        pattern = device(("pattern", 10_000, b"x" * 100))
        assert core.SendJob([fd], 4096, 8192, 0, [synth]).direct
        assert core.SendJob([fd], 4096, 8192, 0, [pattern]).direct
        assert not core.SendJob([fd], 4096, 8192, 0, [device(("fd", 0, False))]).direct
        assert not core.SendJob([fd], 4096, 8192, 0, [synth, synth]).direct
        assert not core.SendJob([fd], 4096, 10_000, 0, [synth]).direct


def test_a_socket_source_is_read_a_pipe_spliced() -> None:
    """1 MiB packets from a pipe go through the channel pipes without a copy; from a
    socket they are read (spliced, a socket's small pieces filled the channel's pipe and
    1 MiB packets took ~50 ms each), unless zero-copy is forced (2)."""
    import threading

    assert core.SendJob is not None
    size = 4 << 20
    for kind, mode, spliced in (("pipe", 1, True), ("socket", 1, False), ("socket", 2, True)):
        writer: Any
        if kind == "pipe":
            rfd, wfd = os.pipe()
            writer = os.fdopen(wfd, "wb", buffering=0)
        else:
            ra, wa = socket.socketpair()
            rfd = ra.detach()
            writer = wa.makefile("wb", buffering=0)
            wa.close()

        def feed(w: Any = writer) -> None:
            with w:
                for _ in range(size >> 20):
                    w.write(b"\x5a" * (1 << 20))

        a, b = socket.socketpair()
        feeder = threading.Thread(target=feed)
        feeder.start()
        with a, b:
            job = core.SendJob(
                [a.fileno()], 1 << 20, 1 << 20, 4 << 20,
                [device(("fd", rfd, True))], zerocopy=mode,
            )  # fmt: skip
            job.start()
            got, deadline = 0, time.monotonic() + 60
            while (not job.finished or got < job.channel_bytes[0]) and time.monotonic() < deadline:
                if select.select([b], [], [], 0.05)[0]:  # short: the job may finish meanwhile
                    got += len(b.recv(1 << 20))
            job.join()
            assert job.error is None, (kind, job.error)
            assert (job.zerocopy_bytes > 0) is spliced, (kind, mode, job.zerocopy_bytes)
        feeder.join()
        os.close(rfd)


@pytest.mark.parametrize("direct", [True, False])
def test_a_stalled_channel_holds_the_others_back(direct: bool) -> None:
    """Channel 0's peer reads nothing: channel 1 must stop within the job's window of it
    (a receiver holds every packet above its first missing idx), not send its whole
    share; once channel 0 is read, both finish. Direct channel threads used to drift
    apart: 64 KiB x 4 left a receiver holding 215 MB."""
    assert core.SendJob is not None
    packet, size, limit = 65536, 64 << 20, 1 << 20
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        job = core.SendJob(
            [a.fileno() for a, _ in pairs],
            packet,
            1 << 20,
            limit,
            [device(("synth", size, 4, _base(4)))],
            direct=direct,
        )
        assert job.direct is direct
        job.start()
        peer0, peer1 = pairs[0][1], pairs[1][1]
        got1 = 0
        while select.select([peer1], [], [], 0.5)[0]:  # until channel 1 is quiet for 0.5 s
            got1 += len(peer1.recv(1 << 20))
            assert got1 < 8 << 20, "channel 1 ran ahead of a stalled channel 0"
        assert not job.finished
        got = {peer0: 0, peer1: got1}
        deadline = time.monotonic() + 60
        while not job.finished or any(select.select(list(got), [], [], 0)[0]):
            assert time.monotonic() < deadline
            for peer in select.select(list(got), [], [], 0.1)[0]:
                got[peer] += len(peer.recv(1 << 20))
        job.join()
        assert job.error is None
        assert sum(got.values()) == sum(job.channel_bytes)
        assert job.device_counts == ((size, size // packet + 1),)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
