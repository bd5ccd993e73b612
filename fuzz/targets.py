"""The fuzz targets: each takes one input (bytes) and raises only on a real bug.

The rule for every peer-facing decoder (STYLE.md rule 8): garbage parses or raises our
error, never anything else, and never hangs. On top of that:

- ``framer`` runs every implementation of the channel framer on the same bytes, sliced
  the same way, and requires the same events and the same error text (the C core mirrors
  the Python reference); one input in two drives it through ``pump_recv`` over a
  scripted non-blocking receive instead, and compares what each device received.
- ``control`` checks that every fd handed to the decoder comes out exactly once: in an
  ``attach-fd`` message, in ``orphans`` or in ``pending_fds`` (none leaked, none closed
  twice).
- ``vfio_user`` drives the client and server connection state machines.
- ``vfio_user_server`` drives a whole device's request handlers with real fds attached
  (`fuzz.vfio_user_server`): replies or errnos only, and no fd leaked or closed twice.
- ``vfio_user_connection`` serves one client connection over a real socketpair, the byte
  stream cut anywhere, MIG_DATA_WRITE bodies received into the emulator's `WriteBuffer`
  (`fuzz.vfio_user_connection`): replies and the emulator's log equal a twin device's fed
  whole requests, a body cut short resets the device, no fd leaked.
- ``vfio_user_dirty`` compares the server's sparse numpy dirty log with the page-by-page
  definition (`fuzz.vfio_user_dirty`): marks anywhere in a region of several chunks,
  reports in smaller and larger pages than the logging page, regions not aligned to it.
- ``wire`` checks the handshake and the config blob checks.

The first bytes of an input choose how it is sliced and configured, so that the fuzzer
can explore the slicing too; the rest is the stream.
"""

from __future__ import annotations

import fcntl
import os
import random
import types
from collections.abc import Callable

import vfiomig._core as core
from fuzz.vfio_user_connection import fuzz_vfio_user_connection
from fuzz.vfio_user_dirty import fuzz_vfio_user_dirty
from fuzz.vfio_user_server import FuzzBug, fuzz_vfio_user_server
from vfiomig._core._errors import VfioMigError
from vfiomig._core._wire import (
    HANDSHAKE_SIZE,
    check_config_blob,
    decode_handshake,
    encode_handshake,
)
from vfiomig.control._proto import (
    AttachFd,
    ControlDecoder,
    ControlFramingError,
    ControlMessageError,
)
from vfiomig.vfio_user import Command, ProtocolError
from vfiomig.vfio_user._protocol import ClientConnection, ServerConnection

UUID = bytes(range(16))
#: A small cap, so that size checks are reachable with small inputs.
PACKET_CAP = 1 << 16
#: A small receive buffer (the C core's block), so that every path of `pump_recv` is taken:
#: packets from 2 KiB up go into their own buffer, smaller ones into the block, where the C
#: core keeps them until written (its take_ready batches pin them: `vfiomig._native.Run`),
#: and the block turns over often.
BUFFER_SIZE = 8192


def _slices(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    i = 0
    top = 1 + (seed % 7) * 40  # seed 0 feeds one byte at a time
    while i < len(data):
        n = rng.randint(1, top)
        out.append(data[i : i + n])
        i += n
    return out


def _run_framer(impl: types.ModuleType, stream: bytes, seed: int, ram: bool) -> list[object]:
    """Feed ``stream`` to one framer; return the trace of events (and the final error)."""
    framer = impl.Framer(
        uuid=UUID,
        channels=4,
        packet_cap=PACKET_CAP,
        ram_page_count=2 if ram else None,
        label="fuzz",
        buffer_size=BUFFER_SIZE,
    )
    trace: list[object] = []
    rng = random.Random(seed)
    try:
        for piece in [*_slices(stream, seed), b""]:
            framer.feed(piece)
            while True:
                if framer.current is not None:
                    # Packet data: read what is buffered, whole or in small pieces.
                    taken = framer.take_payload() if rng.random() < 0.5 else None
                    if taken is not None:
                        trace.append(("data", len(taken)))
                        continue
                    chunk = bytearray(rng.randint(1, 64))
                    n = framer.read_payload_into(memoryview(chunk))
                    if n == 0:
                        break  # wait for more bytes
                    trace.append(("data", bytes(chunk[:n])))
                    continue
                ev = framer.next_event()
                if ev is impl.NEED_DATA:
                    break
                trace.append(repr(ev))
                if type(ev).__name__ == "ChannelEnd":
                    return trace
        raise FuzzBug("framer neither ended nor failed at end of stream")
    except VfioMigError as exc:
        trace.append((type(exc).__name__, str(exc)))
        # Poisoned: the same error again.
        try:
            framer.next_event()
        except VfioMigError as again:
            if str(again) != str(exc):
                raise FuzzBug(f"poisoned framer raised {again!r} after {exc!r}") from None
        else:
            raise FuzzBug(f"framer not poisoned after {exc!r}") from None
    return trace


def _ready_bytes(ready: core.Ready, *, through_fd: bool) -> bytes:
    """A batch's bytes: its chunks one by one (as most sinks take them), or, for the C
    core's `Run`, written from C with ``write_to`` into a one-page non-blocking pipe (short
    writes: the run's cursor carries on from where each write stopped)."""
    chunks = ready.chunks
    write_to = getattr(chunks, "write_to", None)
    if not through_fd or write_to is None:
        return b"".join(bytes(c) for c in chunks)
    out = bytearray()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        while chunks.remaining:  # type: ignore[attr-defined]
            try:
                write_to(w)
            except BlockingIOError:
                pass
            out += os.read(r, 1 << 16)
    finally:
        os.close(r)
        os.close(w)
    return bytes(out)


def _run_pump_recv(impl: types.ModuleType, stream: bytes, seed: int, ram: bool) -> list[object]:
    """Drive one framer with `Framer.pump_recv` over a scripted non-blocking receive, as a
    channel task does; return what each device received, statuses and the final error."""
    framer = impl.Framer(
        uuid=UUID,
        channels=4,
        packet_cap=PACKET_CAP,
        ram_page_count=2 if ram else None,
        buffer_size=BUFFER_SIZE,
    )
    rng = random.Random(seed)
    pieces = _slices(stream, seed)

    def recv_into(view: memoryview) -> int:
        if rng.random() < 0.3:
            raise BlockingIOError
        if not pieces:
            return 0
        piece = pieces.pop(0)
        n = min(len(view), len(piece))
        view[:n] = piece[:n]
        if n < len(piece):
            pieces.insert(0, piece[n:])
        return n

    def fill(size: int) -> None:
        """Receive into the framer's buffer as a channel's slow path does (retrying)."""
        while True:
            with framer.get_buffer(size) as view:
                try:
                    n = recv_into(view)
                except BlockingIOError:
                    continue
            framer.commit(n)
            return

    budget = impl.Budget(1 << 30)
    bufs: dict[tuple[str, int], object] = {}
    routes: dict[tuple[str, int], object] = {}
    trace: list[object] = []
    try:
        while (ev := framer.next_event()) is impl.NEED_DATA:
            fill(64)
        trace.append(repr(ev))
        while True:
            status, done, header = framer.pump_recv(recv_into, routes, rng.randint(1, 4096))
            trace.append((status, done))
            if status in (impl.PUMP_NEED_DATA, impl.PUMP_WOULD_BLOCK):
                continue
            if status == impl.PUMP_END:
                break
            key = (header.idstr, header.instance)
            if key not in bufs:
                bufs[key] = impl.ReorderBuffer(f"{key[0]}/{key[1]}", budget)
                bufs[key].open_gate()  # type: ignore[attr-defined]
            buf = bufs[key]
            if not buf.offer(header.version, header.idx, header.flags, header.size):  # type: ignore[attr-defined]
                raise FuzzBug("an offer was refused with an unlimited budget")
            routes[key] = buf
            if header.size and rng.random() < 0.5:  # its data left to pump_recv
                framer.defer_payload(buf)
                continue
            data = bytearray(header.size)
            got = 0
            while got < header.size:
                got += framer.read_payload_into(memoryview(data)[got:])
                if got < header.size:
                    fill(rng.randint(1, 512))
            buf.deliver(header.idx, bytes(data))  # type: ignore[attr-defined]
    except VfioMigError as exc:
        trace.append((type(exc).__name__, str(exc)))
    for key, buf in sorted(bufs.items()):
        out = bytearray()
        try:
            while (ready := buf.take_ready()) is not None:  # type: ignore[attr-defined]
                out += _ready_bytes(ready, through_fd=rng.random() < 0.5)
                buf.written(ready.nbytes)  # type: ignore[attr-defined]
                ready.release()
        except VfioMigError as exc:  # a buffer poisoned by the error above
            out += f"<{exc}>".encode()
        trace.append((key, bytes(out), buf.config))  # type: ignore[attr-defined]
    return trace


def fuzz_framer(data: bytes, impls: dict[str, types.ModuleType] | None = None) -> None:
    """Every implementation of the framer: same events, same errors, only our errors."""
    if len(data) < 2:
        return
    seed, mode, stream = data[0], data[1], data[2:]
    if mode & 1:  # most inputs start with a valid handshake, so packets get explored
        stream = encode_handshake(UUID, mode >> 6) + stream
    impls = impls or core.IMPLEMENTATIONS
    run = _run_pump_recv if mode & 4 else _run_framer
    traces = {name: run(impl, stream, seed, bool(mode & 2)) for name, impl in impls.items()}
    first = next(iter(traces.values()))
    for name, trace in traces.items():
        if trace != first:
            raise FuzzBug(f"implementations differ: {name}: {trace} vs {first}")


def fuzz_wire(data: bytes) -> None:
    """The handshake decoder and the config blob check raise only our errors."""
    head = data[:HANDSHAKE_SIZE].ljust(HANDSHAKE_SIZE, b"\0")
    try:
        cid = decode_handshake(head, uuid=UUID, channels=8)
    except VfioMigError:
        pass
    else:
        if not 0 <= cid < 8 or head[8:24] != UUID:
            raise FuzzBug(f"handshake accepted with channel {cid}")
    try:
        check_config_blob("dev/0", 7, data)
    except VfioMigError as exc:
        if not str(exc).startswith("dev/0: config packet idx 7 "):
            raise FuzzBug(f"config error without device and idx: {exc}") from None


def fuzz_control(data: bytes) -> None:
    """The control decoder: only our errors; every fd given comes out exactly once."""
    if not data:
        return
    seed, stream = data[0], data[1:]
    decoder = ControlDecoder(max_message=4096)
    given: list[int] = []
    claimed: list[int] = []
    next_fd = 1000
    rng = random.Random(seed)
    try:
        for piece in _slices(stream, seed):
            fds: list[int] = []
            if rng.random() < 0.3:
                fds = list(range(next_fd, next_fd + rng.randint(1, 2)))
                next_fd += len(fds)
            given += fds
            decoder.feed(piece, fds)
            while True:
                try:
                    msg = decoder.next_message()
                except ControlMessageError:
                    continue
                if msg is None:
                    break
                if isinstance(msg, AttachFd):
                    claimed += msg.fds
    except ControlFramingError:
        pass
    out = sorted(claimed + decoder.orphans + decoder.pending_fds)
    if out != sorted(given):
        raise FuzzBug(f"fds given {given}, accounted {out}")


def fuzz_vfio_user(data: bytes) -> None:
    """The vfio-user server and client connections raise only ProtocolError."""
    if not data:
        return
    seed, stream = data[0], data[1:]
    server = ServerConnection(max_msg_size=256)
    try:
        for piece in [*_slices(stream, seed), b""]:
            server.receive_data(piece)
            while server.next_request() is not None:
                pass
    except ProtocolError:
        pass
    client = ClientConnection(max_msg_size=256)
    for command in (Command.VERSION, Command.DEVICE_FEATURE, Command.MIG_DATA_WRITE):
        client.send(command, b"")
    try:
        for piece in [*_slices(stream, seed), b""]:
            client.receive_data(piece)
            while client.next_reply() is not None:
                pass
    except ProtocolError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "framer": fuzz_framer,
    "wire": fuzz_wire,
    "control": fuzz_control,
    "vfio_user": fuzz_vfio_user,
    "vfio_user_server": fuzz_vfio_user_server,
    "vfio_user_connection": fuzz_vfio_user_connection,
    "vfio_user_dirty": fuzz_vfio_user_dirty,
}
