"""The ``vfio_user_connection`` fuzz target: one client connection of the vfio-user server
(`serve_vfio_user_connection`, i.e. `_connection.Connection`) over a real socketpair, with
MIG_DATA_WRITE bodies received straight into the emulator's `WriteBuffer`.

An input is ``[seed][mode][cut][plan x4]``, then records ``[op][a][b][c]``, one request each
(`_request`): MIG_DATA_WRITEs valid and hostile (argsz or size that disagree with what the
message carries, sizes over the client's limit, message sizes over the server's, empty
bodies, headers below 16 bytes), MIG_DEVICE_STATE transitions, region reads and writes,
resets, MIG_DATA_READs, garbage commands, NO_REPLY requests and stray replies.

- ``seed`` cuts the byte stream into sends (anywhere: mid-header, mid-body), with or
  without a scheduling point between two sends.
- ``mode``: bits 0-1 how the client ends (shuts down its sending side and reads every
  reply; closes its socket; stalls while the server is cancelled); bits 2-3 both set: no
  VERSION first; bits 4-5 the client's max_data_xfer_size; bit 6 start in RESUMING; bit 7
  fds (eventfds) ride with some sends once the VERSION is answered.
- ``cut``: the stream ends ``7 * cut`` bytes early (inside a message, or a body).
- ``plan``: how the emulator treats a write of each size (`_behaviour`): it takes it,
  declines the buffer (None: `write_data`), refuses (OSError), hands a short, read-only,
  strided or larger view, or fails the commit; `write_data` takes or refuses a write of
  that size alike, so the outcome of a whole write does not depend on the path.

The model is a twin device without a `WriteBuffer`, handed the same whole requests through
its handlers (`VfioUserDevice.handle`): what the buffered path does. Per input:

- the reply stream is exactly the twin's replies, in order (errno, payload; none for
  NO_REPLY); a request cut short gets a reply only if the fast path refused its header;
- the emulator's log (states entered, writes taken with the bytes the view held at commit
  time, resets) equals the twin's; a body cut short is never committed and resets the
  device (`ResetReason.TORN_WRITE`), one whose path declined or refused it does not;
- no byte outside the first ``size`` bytes of a view changes, no committed byte changes;
- nothing but `FuzzBug` escapes, nothing hangs (10 s), the process has the fds it had.

A client that closes its socket without reading may stop the server at a reply it cannot
send: then the replies are a prefix of the expected ones, and the log a prefix of the
twin's, possibly followed by a torn-write reset (the send failed inside a body).
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
from collections.abc import Sequence
from typing import Final

import trio
import trio.testing

from fuzz.vfio_user_server import FuzzBug, count_fds, sample_device
from vfiomig.vfio_user import Capabilities, MigState, ResetReason, SharedMemory, VfioUserDevice
from vfiomig.vfio_user._header import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER,
    HEADER_SIZE,
    Command,
)
from vfiomig.vfio_user._migration_bodies import (
    DATA_HEAD_SIZE,
    FEATURE_GET,
    FEATURE_MIG_DEVICE_STATE,
    FEATURE_SET,
    MIG_SIZES,
    WRITE,
)
from vfiomig.vfio_user._version import Version
from vfiomig.vfio_user.server._connection import _errno_of
from vfiomig.vfio_user.server._handlers import handle
from vfiomig.vfio_user.server._serve import serve_vfio_user_connection
from vfiomig.vfio_user.server._session import CloseConnection, Session

Log = list[tuple[str, object]]

ACCEPT, DECLINE, REFUSE, SHORT, READONLY, STRIDED, LARGER, COMMIT_FAILS = range(8)
#: The behaviours that hand the server a view it receives into (a cut body is torn).
_RECEIVES: Final = frozenset({ACCEPT, LARGER, COMMIT_FAILS})
_BAD_VIEW: Final = frozenset({SHORT, READONLY, STRIDED})
FILL: Final = 0xEE  # never in a body (`_body`)
GUARD: Final = 16
HEAD_SIZE: Final = 7
_LIMITS: Final = (None, 64, 512, 4096)
_STATES: Final = (MigState.RUNNING, MigState.STOP, MigState.RESUMING, MigState.STOP_COPY)
_STATE: Final = struct.Struct("=IIII")
_KEEP_FDS: Final = (Command.VERSION, Command.DMA_MAP, Command.DEVICE_SET_IRQS)
_ACCESS: Final = struct.Struct("=QII")
#: A bound for hangs only: an input takes milliseconds.
TIMEOUT: Final = 10.0


def _behaviour(plan: bytes, size: int) -> int:
    b = plan[size % len(plan)] % 12
    return b if b < 8 else ACCEPT


class _Twin:
    """The model emulator: `MigrationCallbacks` only, everything it is told in ``log``."""

    def __init__(self, plan: bytes) -> None:
        self.plan = plan
        self.log: Log = []

    def transition(self, state: MigState) -> None:
        self.log.append(("state", state.name))

    def read_data(self, size: int) -> bytes:
        return b""

    def write_data(self, data: memoryview) -> int:
        b = _behaviour(self.plan, len(data))
        if b == REFUSE:
            raise OSError(errno.ENOSPC, f"no room for {len(data)} bytes")
        if b in _BAD_VIEW:
            raise OSError(errno.EINVAL, f"a write of {len(data)} bytes")
        if b == COMMIT_FAILS:
            raise OSError(errno.EIO, f"a write of {len(data)} bytes failed")
        self.log.append(("write", bytes(data)))
        return len(data)

    def reset(self, reason: ResetReason) -> None:
        self.log.append(("reset", reason.value))


class _Store(_Twin):
    """The emulator under test: its state in one preallocated area, loaded through
    `WriteBuffer`; each view is a fresh stretch of the area, with a guard after it."""

    def __init__(self, plan: bytes, capacity: int) -> None:
        super().__init__(plan)
        self.area = bytearray([FILL]) * capacity
        self.at = 0
        self.view: tuple[int, int] | None = None  # (start, size) handed out, not committed
        self.writable: list[tuple[int, int]] = []  # every (start, size) the server may fill
        self.committed: list[tuple[int, bytes]] = []

    def write_buffer(self, size: int) -> memoryview | None:
        b = _behaviour(self.plan, size)
        if b == DECLINE:
            return None
        if b == REFUSE:
            raise OSError(errno.ENOSPC, f"no room for {size} bytes")
        if b == READONLY:
            return memoryview(bytes(size))
        start = self.at
        self.at += 2 * size + 2 * GUARD
        if self.at > len(self.area):
            raise RuntimeError(f"harness: area of {len(self.area)} bytes is too small")
        area = memoryview(self.area)
        if b == SHORT:
            return area[start : start + size - 1]
        if b == STRIDED:  # size + 1 items: never C-contiguous
            return area[start : start + 2 * size + 2 : 2]
        self.view = (start, size)
        self.writable.append((start, size))
        return area[start : start + size + (GUARD if b == LARGER else 0)]

    def write_commit(self, size: int) -> None:
        if self.view is None or self.view[1] != size:
            raise FuzzBug(f"write_commit({size}) for view {self.view}")
        start, _ = self.view
        self.view = None
        if _behaviour(self.plan, size) == COMMIT_FAILS:
            raise OSError(errno.EIO, f"a write of {size} bytes failed")
        data = bytes(self.area[start : start + size])
        self.committed.append((start, data))
        self.log.append(("write", data))

    def check_area(self) -> None:
        """Committed bytes are as they were at commit; nothing outside a view changed."""
        for start, data in self.committed:
            if self.area[start : start + len(data)] != data:
                raise FuzzBug(f"committed bytes at {start} changed after the commit")
        rest = bytearray(self.area)
        for start, size in self.writable:
            rest[start : start + size] = bytes([FILL]) * size
        if rest.count(FILL) != len(rest):
            raise FuzzBug("bytes outside a write_buffer view were written")


def _body(seq: int, size: int) -> bytes:
    return bytes(1 + (seq * 13 + i) % 200 for i in range(size))  # never FILL


def _message(msg_id: int, command: int, payload: bytes, flags: int = 0, size: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, size or HEADER_SIZE + len(payload), flags, 0) + payload


def _write(
    msg_id: int, data: bytes, flags: int = 0, size: int | None = None, argsz: int = 0
) -> bytes:
    n = len(data) if size is None else size
    return _message(msg_id, WRITE, MIG_SIZES.pack(argsz or 8 + n, n) + data, flags)


def _set_state(msg_id: int, state: int) -> bytes:
    payload = _STATE.pack(16, FEATURE_SET | FEATURE_MIG_DEVICE_STATE, state, 0)
    return _message(msg_id, Command.DEVICE_FEATURE, payload)


def _request(msg_id: int, op: int, a: int, b: int, c: int, limit: int) -> bytes:
    """One request from a record (see the module docstring)."""
    size = a * 16 + b % 16
    op %= 13
    if op <= 2:
        return _write(msg_id, _body(msg_id, size))
    if op == 3:  # hostile lengths
        data = _body(msg_id, size)
        kind = c % 8
        if kind == 0:
            return _write(msg_id, data, argsz=8 + size - 1 if size else 7)
        if kind == 1:
            return _write(msg_id, data, size=size + 1)
        if kind == 2:
            return _write(msg_id, data, size=max(size - 1, 0))
        if kind == 3:
            return _write(msg_id, _body(msg_id, limit + 1 + b))
        if kind == 4:
            return _message(msg_id, WRITE, MIG_SIZES.pack(8 + size, size) + data[:8], size=1 << 31)
        if kind == 5:
            return _write(msg_id, b"")
        if kind == 6:
            return _message(msg_id, WRITE, MIG_SIZES.pack(8, 0), size=b % HEADER_SIZE)
        return _message(msg_id, WRITE, MIG_SIZES.pack(8 + size, size)[: c % 8])
    if op == 4:
        return _set_state(msg_id, _STATES[a % 4] if b < 240 else b)
    if op == 5:
        payload = _STATE.pack(16, FEATURE_GET | FEATURE_MIG_DEVICE_STATE, 0, 0)
        return _message(msg_id, Command.DEVICE_FEATURE, payload[: 8 + 8 * (c & 1)])
    if op == 6:
        region = (0, 2, 7, 5)[a % 4]
        return _message(msg_id, Command.REGION_READ, _ACCESS.pack(b, region, c % 64))
    if op == 7:
        count = c % 32
        data = _body(msg_id, count - (a & 1) if count else 0)
        return _message(msg_id, Command.REGION_WRITE, _ACCESS.pack(b, a % 3, count) + data)
    if op == 8:
        return _message(msg_id, Command.DEVICE_RESET, b"")
    if op == 9:
        command = a << 8 | b  # not one that keeps fds: whether fds ride along is timing
        return _message(msg_id, command + 100 * (command in _KEEP_FDS), _body(msg_id, c % 40))
    if op == 10:
        return _message(msg_id, Command.MIG_DATA_READ, MIG_SIZES.pack(8 + a, a))
    if op == 11:  # a write that asks for no reply; a stray reply; another message type
        flags = (FLAG_NO_REPLY, FLAG_TYPE_REPLY, 2, FLAG_NO_REPLY | FLAG_ERROR)[c % 4]
        return _write(msg_id, _body(msg_id, size), flags=flags)
    return _write(msg_id, _body(msg_id, size), argsz=8 + size + c)  # argsz above: fine


def _stream(data: bytes) -> tuple[bytes, int]:
    """The client's byte stream and where its VERSION ends (0: none sent)."""
    mode, cut = data[1], data[2]
    limit = _LIMITS[mode >> 4 & 3]
    out = bytearray()
    version_end = 0
    if mode & 0x0C != 0x0C:
        caps = Capabilities(max_data_xfer_size=limit)
        out += _message(0, Command.VERSION, Version(0, 2, caps).pack())
        version_end = len(out)
    if mode & 0x40:
        out += _set_state(1, MigState.RESUMING)
    records = data[HEAD_SIZE:]
    for i in range(0, len(records) - 3, 4):
        op, a, b, c = records[i : i + 4]
        out += _request(2 + i // 4, op, a, b, c, limit or 4096)
    return bytes(out[: max(0, len(out) - 7 * cut)]), version_end


def _reply(msg_id: int, command: int, error: int | None, payload: bytes = b"") -> bytes:
    flags = FLAG_TYPE_REPLY | (FLAG_ERROR if error is not None else 0)
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error or 0) + payload


def expect(stream: bytes, twin: VfioUserDevice, plan: bytes) -> bytes:
    """The replies the server owes for ``stream`` (the twin's log gets the emulator's
    side): whole requests through the twin's handlers, then the fast path's rules for a
    MIG_DATA_WRITE cut short."""
    session = Session()
    replies = bytearray()
    pos = 0
    while len(stream) - pos >= HEADER_SIZE:
        msg_id, command, size, flags, _ = HEADER.unpack_from(stream, pos)
        wants_reply = not flags & FLAG_NO_REPLY
        if size < HEADER_SIZE:
            return bytes(replies)  # the framing is lost
        if size > twin.max_msg_size:
            if not flags & (FLAG_NO_REPLY | FLAG_TYPE_MASK):
                replies += _reply(msg_id, command, errno.EINVAL)
            pos += size
            continue
        if pos + size > len(stream):
            break
        if flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY:
            return bytes(replies)  # a stray reply: the framing is lost
        payload = memoryview(stream)[pos + HEADER_SIZE : pos + size]
        pos += size
        try:
            reply = handle(twin, session, command, payload, [])
        except OSError as exc:
            if wants_reply:
                replies += _reply(msg_id, command, _errno_of(exc))
        except CloseConnection as exc:
            if wants_reply:
                replies += _reply(msg_id, command, exc.errno)
            return bytes(replies)
        else:
            if wants_reply:
                replies += _reply(msg_id, command, None, b"".join(bytes(p) for p in reply.parts))
    replies += _cut_short(stream[pos:], twin, session, plan)
    return bytes(replies)


def _cut_short(rest: bytes, twin: VfioUserDevice, session: Session, plan: bytes) -> bytes:
    """What a MIG_DATA_WRITE cut short gets on the fast path: its header refused (the
    reply), or a view received into and then torn (a reset), or nothing."""
    if len(rest) < DATA_HEAD_SIZE:
        return b""
    msg_id, command, size, flags, _ = HEADER.unpack_from(rest)
    argsz, data_size = MIG_SIZES.unpack_from(rest, HEADER_SIZE)
    if (
        command != WRITE
        or flags & FLAG_TYPE_MASK
        or not session.negotiated
        or data_size != size - DATA_HEAD_SIZE
        or argsz < 8 + data_size
        or not 0 < data_size <= session.client_max_data_xfer_size
    ):
        return b""
    b = _behaviour(plan, data_size)
    error = None
    if twin.state != MigState.RESUMING or b in _BAD_VIEW:
        error = errno.EINVAL
    elif b == REFUSE:
        error = errno.ENOSPC
    elif b in _RECEIVES:
        twin.do_reset(ResetReason.TORN_WRITE)
    if error is None or flags & FLAG_NO_REPLY:
        return b""
    return _reply(msg_id, command, error)


def _pieces(stream: bytes, rng: random.Random) -> list[tuple[int, int]]:
    """(start, end) of each send: cut anywhere, from single bytes to whole bursts."""
    out = []
    at = 0
    while at < len(stream):
        n = rng.choice((1, 2, 7, 15, 16, 17, 23, 24, 25, 60, 300, 4096, 70_000))
        out.append((at, min(at + n, len(stream))))
        at += n
    return out


async def _session(
    stream: bytes, version_end: int, mode: int, rng: random.Random, device: VfioUserDevice
) -> bytes:
    """Serve one connection while a client sends ``stream``; the bytes it got back."""
    end = mode & 3
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = trio.socket.from_stdlib_socket(theirs)
    client = trio.socket.from_stdlib_socket(ours)
    received = bytearray()
    answered = trio.Event()  # the VERSION's reply is in: fds no longer change its fate
    escaped: list[BaseException] = []

    async def serve(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope, server:
            task_status.started(scope)
            try:
                await serve_vfio_user_connection(server, device)
            except Exception as exc:  # reported below as the bug it is
                escaped.append(exc)

    async def read() -> None:
        while True:
            try:
                data = await client.recv(1 << 16)
            except (trio.ClosedResourceError, OSError):
                return  # closed by the client's own end (EBADF), or reset by the server
            if not data:
                return
            received.extend(data)
            if len(received) >= HEADER_SIZE and len(received) >= HEADER.unpack_from(received)[2]:
                answered.set()

    async def send(scope: trio.CancelScope) -> None:
        try:
            for start, stop in _pieces(stream, rng):
                fds = []
                if mode & 0x80 and version_end and start >= version_end and rng.random() < 0.2:
                    await answered.wait()
                    fds = [os.eventfd(0) for _ in range(rng.randint(1, 2))]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                try:
                    sent = await client.sendmsg([stream[start:stop]], anc if fds else [])
                    while start + sent < stop:
                        sent += await client.send(stream[start + sent : stop])
                finally:
                    for fd in fds:
                        os.close(fd)
                if rng.random() < 0.7:
                    await trio.lowlevel.checkpoint()
        except OSError:
            pass  # the server hung up: it may, once the framing is lost
        if end == 2:  # stall: the server is cancelled wherever it waits
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        elif end == 1:
            client.close()
        else:
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # gone already

    with client:
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(serve)
            nursery.start_soon(read)
            nursery.start_soon(send, scope)
    if escaped:
        raise FuzzBug(f"serve_vfio_user_connection raised {escaped[0]!r}")
    return bytes(received)


def fuzz_vfio_user_connection(data: bytes) -> None:
    if len(data) < HEAD_SIZE:
        return
    seed, mode, plan = data[0], data[1], data[3:HEAD_SIZE]
    stream, version_end = _stream(data)
    memories = [SharedMemory(8192), SharedMemory(8192)]
    try:
        twin_store, store = _Twin(plan), _Store(plan, 4 * len(stream) + 16384)
        twin = sample_device(memories[0], migration=twin_store, reset=twin_store.reset)
        device = sample_device(memories[1], migration=store, reset=store.reset)
        owed = expect(stream, twin, plan)
        before = count_fds()
        try:
            got = trio.run(_timed, stream, version_end, mode, random.Random(seed), device)
        except trio.TooSlowError:
            raise FuzzBug(f"no end after {TIMEOUT} s") from None
        after = count_fds()
        if after != before:
            raise FuzzBug(f"{after - before:+d} fds after the client went away")
        store.check_area()
        _compare(got, owed, store.log, twin_store.log, strict=mode & 3 != 1)
    finally:
        for memory in memories:
            memory.close()


async def _timed(
    stream: bytes, version_end: int, mode: int, rng: random.Random, device: VfioUserDevice
) -> bytes:
    with trio.fail_after(TIMEOUT):
        return await _session(stream, version_end, mode, rng, device)


def _compare(got: bytes, owed: bytes, log: Log, model: Log, *, strict: bool) -> None:
    if got != owed and (strict or not owed.startswith(got)):
        at = _first_difference(got, owed)
        raise FuzzBug(
            f"replies differ from byte {at}: got {got[at - at % 16 : at + 32]!r}, "
            f"owed {owed[at - at % 16 : at + 32]!r} ({len(got)} of {len(owed)} bytes)"
        )
    if log == model:
        return
    torn = ("reset", ResetReason.TORN_WRITE.value)
    head = log[:-1] if log and log[-1] == torn else log
    if strict or model[: len(head)] != head:
        at = _first_difference(log, model)
        raise FuzzBug(
            f"emulator log differs from the model's at entry {at}: {_brief(log[at : at + 2])}, "
            f"model {_brief(model[at : at + 2])} ({len(log)} and {len(model)} entries)"
        )


def _first_difference(a: Sequence[object], b: Sequence[object]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _brief(log: Log) -> list[object]:
    return [(kind, x[:16] + b"..." if isinstance(x, bytes) else x) for kind, x in log]
