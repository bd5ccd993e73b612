"""libvfio-user's ``samples/server`` as a PRE_COPY source: its device offers PRE_COPY (the
library reports STOP_COPY | PRE_COPY) and, while running, gives BAR1 (12288 bytes) as
precopy data; STOP_COPY then gives BAR1 and BAR0 (12296 bytes). `vfiomig send` sends the
first as ``precopy`` messages before switchover, the rest as multifd packets, into a
receive session whose sink keeps every byte in order."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from tests.integration.control_helpers import IDSTR, UUID, running_receiver
from tests.libvfio_user import LibVfioUser
from vfiomig import SendDevice, send_migration
from vfiomig import _core as core
from vfiomig.send import PrecopyOptions
from vfiomig.testing import MemorySink
from vfiomig.vfio_user import VfioUserClient, VfioUserSource

BAR1, BAR0 = 0x3000, 8
#: BAR1's contents, written before the migration; BAR0 (the sample's time_t) stays 0.
PATTERN = random.Random(1).randbytes(BAR1)


class _PatternedSource(VfioUserSource):
    """The source, with BAR1 written through its own connection before PRE_COPY: the
    state then says which bytes went where, not just how many."""

    async def _connect(self) -> VfioUserClient:
        client = await super()._connect()
        await client.region_write(1, 0, PATTERN)
        return client


async def test_libvfio_user_server_as_a_pre_copy_source(
    tmp_path: Path, libvfio_user: LibVfioUser
) -> None:
    sock = tmp_path / "lvu.sock"
    server = libvfio_user.sample_server(sock)
    sink = MemorySink()
    try:
        with trio.fail_after(30):
            async with running_receiver(tmp_path, [(IDSTR, 0, sink)]) as rx:
                report = await send_migration(
                    connect_to=[rx.data_address],
                    channels=2,
                    uuid=UUID,
                    devices=[SendDevice(IDSTR, 0, source := _PatternedSource(sock))],
                    packet_size=4096,
                    control=rx.control_address,
                    precopy_options=PrecopyOptions(threshold=0, rounds=4),
                    control_timeout=10,
                )
        log, _ = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    phase = report.precopy[f"{IDSTR}/0"]
    # Round 1 read BAR1 to the device's temporary end; round 2 found nothing more.
    assert (phase.rounds, phase.bytes, phase.pending, phase.stopped) == (
        2,
        BAR1,
        (BAR1, 0),
        "converged",
    )
    assert report.bytes == BAR1 + BAR0
    # The precopy phase read in Python; STOP_COPY by the C send path's reader, if any.
    assert source.read_natively == (getattr(core, "SendJob", None) is not None)
    # Precopy: BAR1; STOP_COPY: BAR1 again, then BAR0.
    assert bytes(sink.data) == PATTERN + PATTERN + bytes(BAR0) and "finish" in sink.calls
    # The server walked RUNNING -> PRE_COPY -> STOP_AND_COPY -> STOP (its own numbering:
    # PRE_COPY 3, STOP_AND_COPY 2, STOP 0), and its STOP asserts that all 12296 bytes of
    # STOP_COPY data were read. It exits cleanly when the client hangs up.
    transitions = [
        line.rsplit(" ", 1)[1] for line in log.splitlines() if "transition to device state" in line
    ]
    assert transitions == ["3", "2", "0"], log
    assert server.returncode == 0, log
