"""Soak: many back-to-back receive sessions in one process, faults drawn at random.

``python -m tests.soak --sessions 500 [--seed N]`` prints a table per fault kind and the
RSS and open-fd figures; it exits 1 when a session ended wrongly or RSS/fds grew. The CI
part (tests/integration/test_soak.py) runs a short one. See RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import trio

from tests.integration.faults import UUID, connect, idstr, receiver, reset
from vfiomig import SessionReport
from vfiomig._core._wire import encode_packet
from vfiomig.testing import MemorySink, channel_streams, device_packets, synth_config

FAULTS = ("none", "none", "eio", "reset", "missing", "second-config", "stall")


@dataclass
class Row:
    fault: str
    ok: bool
    correct: bool
    seconds: float
    why: str = ""


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def one_session(rng: random.Random, fault: str) -> Row:
    ndev = rng.randint(1, 2)
    channels = rng.randint(1, 3)
    packet = rng.choice((512, 4096, 16384))
    states = [rng.randbytes(rng.randint(1, 200_000)) for _ in range(ndev)]
    k = rng.randrange(max(1, len(states[0]) // packet))
    sinks = [
        MemorySink(fail_at=k * packet if fault == "eio" and i == 0 else None) for i in range(ndev)
    ]
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
    with trio.fail_after(20):
        async with receiver(sinks, channels=channels, stall_timeout=0.3, max_queued=1 << 30) as rx:
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
    prefix = all(bytes(s.data) == st[: len(s.data)] for s, st in zip(sinks, states, strict=True))
    exact = all(bytes(s.data) == st for s, st in zip(sinks, states, strict=True))
    # With a fault: failed leaving a prefix, or loaded with exactly the stream (the fault
    # can land after the last device loaded, e.g. a late second config packet, or miss
    # every packet: a channel that carried only its handshake).
    correct = (ok and exact) if fault == "none" else (prefix and (not ok or exact))
    why = "" if ok else str(out)[:120]
    return Row(fault, ok, correct, seconds, why)


async def soak(sessions: int, seed: int) -> tuple[list[Row], list[tuple[int, int]]]:
    rng = random.Random(seed)
    rows: list[Row] = []
    samples: list[tuple[int, int]] = []
    for _ in range(sessions):
        rows.append(await one_session(rng, rng.choice(FAULTS)))
        samples.append((rss_kib(), fd_count()))
    return rows, samples


def summarize(rows: list[Row], samples: list[tuple[int, int]]) -> tuple[str, bool]:
    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[r.fault].append(r)
    lines = [
        "| fault | sessions | loaded | failed | wrong outcome | mean s | max s |",
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
    lines.append("")
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
