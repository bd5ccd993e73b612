"""Soak: many back-to-back receive sessions in one process, faults drawn at random.

``python -m tests.soak --sessions 500 [--seed N]`` prints a table per fault kind and the
RSS and open-fd figures; it exits 1 when a session ended wrongly or RSS/fds grew. The CI
part (tests/integration/test_soak.py) runs a short one. See RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from tests.integration.faults import UUID, connect, idstr, receiver, reset
from vfiomig import SessionReport
from vfiomig._core._wire import encode_packet
from vfiomig.sinks import Sink
from vfiomig.testing import (
    FakeVfioDevice,
    MemorySink,
    channel_streams,
    device_packets,
    synth_config,
)
from vfiomig.vfio import VfioSink
from vfiomig.vfio_user import BarDevice, MigState, VfioUserSink, serve_vfio_user

FAULTS = ("none", "none", "eio", "reset", "missing", "second-config", "stall")
#: Device 0's sink; the others always get a MemorySink.
SINKS = ("memory", "memory", "vfio", "vfio-user")


class SoakEmulator(BarDevice):
    """A vfio-user device that takes any stream, remembers it (across resets, for the
    prefix check) and fails with EIO where the stream would pass ``fail_at``."""

    def __init__(self, fail_at: int | None) -> None:
        super().__init__((8,))
        self.received = bytearray()
        self.fail_at = fail_at
        self.resets = 0

    def write_data(self, data: memoryview) -> int:
        if self.fail_at is not None and len(self.received) + len(data) > self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        self.received += data
        return len(data)

    def transition(self, state: MigState) -> None:
        self.transitions.append(state)

    def reset(self) -> None:
        self.resets += 1


@dataclass
class Target:
    """Device 0's sink and how to read what its device received and how it was left."""

    sink: Sink
    received: Callable[[], bytes]
    #: Given whether the session loaded, what is wrong with the device's end state, or "".
    check: Callable[[bool], str]


@asynccontextmanager
async def target(kind: str, state: bytes, fail_at: int | None) -> AsyncIterator[Target]:
    if kind == "memory":
        mem = MemorySink(fail_at=fail_at)
        yield Target(mem, lambda: bytes(mem.data), lambda ok: "")
    elif kind == "vfio":
        with FakeVfioDevice(
            expected=state,
            write_errno_at=None if fail_at is None else (fail_at, errno.EIO),
        ) as dev:
            got = bytearray()

            def write(fd: int, data: bytes | bytearray | memoryview) -> int:
                n = dev.write(fd, data)
                got.extend(memoryview(data)[:n])
                return n

            def check(ok: bool) -> str:
                if dev.session_open:
                    return "vfio: a RESUMING session is still open"
                if ok and (dev.loaded != state or dev.state != MigState.STOP):
                    return f"vfio: loaded but the device is in {dev.state.name}"
                if not ok and dev.state == MigState.RESUMING:
                    return "vfio: failed but the device was left in RESUMING"
                return ""

            sink = VfioSink.from_device_fd(dev.open(), owned=True, ioctl=dev.ioctl, write=write)
            yield Target(sink, lambda: bytes(got), check)
    else:
        emu = SoakEmulator(fail_at)

        def check_user(ok: bool) -> str:
            if ok and emu.transitions[-1:] != [MigState.STOP]:
                return f"vfio-user: loaded but the last transition was {emu.transitions[-1:]}"
            if not ok and emu.transitions[-1:] == [MigState.RESUMING] and not emu.resets:
                return "vfio-user: failed and the device was left in RESUMING"
            return ""

        with tempfile.TemporaryDirectory(prefix="vu", dir="/tmp") as tmp:
            path = os.path.join(tmp, "dev")
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_vfio_user, path, emu)
                yield Target(VfioUserSink(path), lambda: bytes(emu.received), check_user)
                nursery.cancel_scope.cancel()


@dataclass
class Row:
    fault: str
    sink: str
    ok: bool
    correct: bool
    seconds: float
    why: str = ""


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class _AbortFailures(logging.Handler):
    """Counts the sinks' reports that an abort could not put a device back."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "did not work" in record.getMessage():
            self.count += 1


_ABORT_FAILURES = _AbortFailures()
logging.getLogger("vfiomig").addHandler(_ABORT_FAILURES)


async def one_session(rng: random.Random, fault: str, kind: str = "memory") -> Row:
    ndev = rng.randint(1, 2)
    channels = rng.randint(1, 3)
    packet = rng.choice((512, 4096, 16384))
    states = [rng.randbytes(rng.randint(1, 200_000)) for _ in range(ndev)]
    k = rng.randrange(max(1, len(states[0]) // packet))
    failures = _ABORT_FAILURES.count
    async with target(kind, states[0], k * packet if fault == "eio" else None) as dev0:
        row = await _run_session(rng, fault, kind, dev0, states, channels, packet, k)
    if _ABORT_FAILURES.count != failures:
        row.correct = False
        row.why = f"an abort could not put the device back; {row.why}"
    return row


async def _run_session(
    rng: random.Random,
    fault: str,
    kind: str,
    dev0: Target,
    states: list[bytes],
    channels: int,
    packet: int,
    k: int,
) -> Row:
    sinks: list[Sink] = [dev0.sink, *(MemorySink() for _ in states[1:])]
    packets: list[bytes] = []
    for i, state in enumerate(states):
        packets += device_packets(idstr(i), 0, state, synth_config(i), packet)
    if fault == "missing":
        del packets[k]
    if fault == "second-config":
        packets.append(encode_packet(idstr(0), 0, 0xFFFF, 1, synth_config(0)))
    if fault != "stall":
        rng.shuffle(packets)  # any arrival order; backpressure needs max_queued to cover it
    streams = channel_streams(packets, channels, UUID, seed=rng.randrange(1000))
    t0 = time.monotonic()
    # Only the stall fault needs the watchdog quick; on the other sessions a short stall
    # timeout would also end the late-channel grace between two connects on a loaded host.
    stall = 0.3 if fault == "stall" else 10.0
    with trio.fail_after(20):
        async with receiver(
            sinks, channels=channels, stall_timeout=stall, max_queued=1 << 30
        ) as rx:
            conns = []
            for c, s in enumerate(streams):
                try:
                    conn = await connect(rx)
                except OSError:
                    continue  # the session already failed and closed its listener
                try:
                    if fault == "reset" and c == 0:
                        await conn.send_all(s[: rng.randint(64, len(s))])
                        reset(conn)
                        continue
                    if fault == "stall" and c == 0:
                        await conn.send_all(s[: len(s) // 2])
                        conns.append(conn)  # half-open: never closed until the end
                        continue
                    await conn.send_all(s)
                except trio.BrokenResourceError:
                    pass  # the session already failed and closed this channel
                await conn.aclose()
            await rx.session.done.wait()
            for conn in conns:
                await conn.aclose()
    seconds = time.monotonic() - t0
    out = rx.outcome[0]
    ok = isinstance(out, SessionReport)
    got = [dev0.received(), *(bytes(s.data) for s in sinks[1:] if isinstance(s, MemorySink))]
    prefix = all(g == st[: len(g)] for g, st in zip(got, states, strict=True))
    exact = all(g == st for g, st in zip(got, states, strict=True))
    # With a fault: failed leaving a prefix, or loaded with exactly the stream (the fault
    # can land after the last device loaded, e.g. a late second config packet, or miss
    # every packet: a channel that carried only its handshake).
    correct = (ok and exact) if fault == "none" else (prefix and (not ok or exact))
    problem = dev0.check(ok)
    why = problem or ("" if ok else str(out)[:120])
    return Row(fault, kind, ok, correct and not problem, seconds, why)


async def soak(sessions: int, seed: int) -> tuple[list[Row], list[tuple[int, int]]]:
    rng = random.Random(seed)
    rows: list[Row] = []
    samples: list[tuple[int, int]] = []
    for _ in range(sessions):
        rows.append(await one_session(rng, rng.choice(FAULTS), rng.choice(SINKS)))
        samples.append((rss_kib(), fd_count()))
    return rows, samples


def summarize(rows: list[Row], samples: list[tuple[int, int]]) -> tuple[str, bool]:
    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[r.fault].append(r)
    for r in rows:
        by[f"sink {r.sink}"].append(r)
    lines = [
        "| fault / sink | sessions | loaded | failed | wrong outcome | mean s | max s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fault, rs in sorted(by.items()):
        secs = [r.seconds for r in rs]
        lines.append(
            f"| {fault} | {len(rs)} | {sum(r.ok for r in rs)} | {sum(not r.ok for r in rs)}"
            f" | {sum(not r.correct for r in rs)} | {sum(secs) / len(secs):.3f} | {max(secs):.3f} |"
        )
    n = max(1, min(10, len(samples) // 4))
    rss0 = sum(s[0] for s in samples[:n]) // n
    rss1 = sum(s[0] for s in samples[-n:]) // n
    fd0, fd1 = samples[0][1], samples[-1][1]
    quarters = [samples[max(0, len(samples) * q // 4 - 1)][0] for q in (1, 2, 3, 4)]
    lines.append("")
    lines.append(f"RSS (KiB) after 1/4, 1/2, 3/4 and all of the sessions: {quarters}")
    lines.append(
        f"RSS (KiB) first {n} sessions {rss0}, last {n} {rss1} (growth {rss1 - rss0});"
        f" open fds after session 1: {fd0}, after the last: {fd1}; max fds {max(s[1] for s in samples)}"
    )
    good = all(r.correct for r in rows) and fd1 <= fd0 and rss1 - rss0 < 32 * 1024
    for r in rows:
        if not r.correct:
            lines.append(f"WRONG: {r}")
    return "\n".join(lines), good


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak")
    p.add_argument("--sessions", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    t0 = time.monotonic()
    rows, samples = trio.run(soak, args.sessions, args.seed)
    table, good = summarize(rows, samples)
    print(table)
    print(f"{args.sessions} sessions in {time.monotonic() - t0:.1f} s, seed {args.seed}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
