"""An emulator that receives its own state over multifd channels, embedding the receiver.

No vfio-user socket on the destination: the emulator runs `vfiomig.serve_receiver`
itself with a `CallbackSink` that feeds its migration callbacks (the libvfio-user v2
shape: ``transition``, ``write_data``), and a config callback. The sender is the library's
`send_migration`, reading the source emulator's state over vfio-user.

Run: python examples/embedded_receiver.py
"""

from __future__ import annotations

import os
import tempfile

import trio

from vfiomig import send_migration
from vfiomig.receive import DeviceSetup, ReceiverConfig, serve_receiver
from vfiomig.send import SendDevice
from vfiomig.sinks import CallbackConfig, CallbackSink
from vfiomig.vfio_user import BarDevice, MigState, VfioUserSource, serve_vfio_user

IDSTR = "0000:00:05.0/vfio"
SESSION = bytes(range(16))


async def main() -> None:
    src = BarDevice((0x40000, 64))
    src.bars[0][:] = os.urandom(0x40000)
    src.bars[1][:] = os.urandom(64)
    dst = BarDevice((0x40000, 64))
    configs: list[bytes] = []

    # The destination emulator enters RESUMING itself and takes the stream as it comes.
    dst.transition(MigState.STOP)
    dst.transition(MigState.RESUMING)

    def write(chunk: memoryview) -> None:
        if dst.write_data(chunk) != len(chunk):
            raise OSError(22, "partial write")

    config = ReceiverConfig(
        uuid=SESSION,
        channels=2,
        devices=[DeviceSetup(IDSTR, 0, CallbackSink(write), CallbackConfig(configs.append))],
        listen=["tcp:127.0.0.1:0"],
        gate="open",
    )
    with trio.fail_after(30), tempfile.TemporaryDirectory(prefix="vfmig", dir="/tmp") as tmp:
        sock = f"{tmp}/src.sock"
        async with trio.open_nursery() as servers:
            await servers.start(serve_vfio_user, sock, src)
            async with trio.open_nursery() as migration:
                # serve_receiver returns once every device is loaded (or raises).
                session = await migration.start(serve_receiver, config)
                await send_migration(
                    connect_to=list(session.bound),
                    channels=2,
                    uuid=SESSION,
                    devices=[SendDevice(IDSTR, 0, VfioUserSource(sock))],
                    packet_size=16 * 1024,
                )
            servers.cancel_scope.cancel()
    dst.transition(MigState.STOP)  # validates the stream and loads the BARs
    assert dst.bars == src.bars, "destination BARs differ"
    print(f"ok: the emulator loaded {sum(map(len, dst.bars))} bytes; config blob {configs[0]!r}")


if __name__ == "__main__":
    trio.run(main)
