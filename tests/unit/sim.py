"""A synchronous simulation of the receive path over the sans-IO core, for property tests:
channels delivered in a chosen interleaving and slicing, backpressure by parking, a loader
that writes whatever is ready."""

from __future__ import annotations

import random
import types
from dataclasses import dataclass, field


@dataclass
class Result:
    data: dict[str, bytearray] = field(default_factory=dict)
    config: dict[str, bytes] = field(default_factory=dict)
    order: list[tuple[str, int, int]] = field(default_factory=list)  # (device, first, end)
    peak_queued: int = 0
    parked: int = 0


def run(
    core: types.ModuleType,
    streams: list[bytes],
    devices: list[str],
    *,
    uuid: bytes,
    seed: int,
    budget: int = 1 << 40,
    max_slice: int = 4096,
    gate_open: bool = True,
) -> Result:
    """Feed channel ``streams`` in a random interleaving of random slices; raise whatever
    the core raises; return what was written. ``devices`` are ``idstr/instance`` names."""
    rng = random.Random(seed)
    bud = core.Budget(budget)
    bufs = {name: core.ReorderBuffer(name, bud) for name in devices}
    if gate_open:
        for b in bufs.values():
            b.open_gate()
    result = Result(data={n: bytearray() for n in devices})
    framers = [core.Framer(uuid=uuid, channels=len(streams)) for _ in streams]
    pos = [0] * len(streams)
    pending: list[object | None] = [None] * len(streams)  # a header waiting for budget
    ended = [False] * len(streams)

    def drain() -> None:
        for name, b in bufs.items():
            while (ready := b.take_ready()) is not None:
                for c in ready.chunks:
                    result.data[name] += c
                if not ready.precopy:
                    result.order.append((name, ready.first_idx, ready.end_idx))
                b.written(ready.nbytes)
            if b.finishable:
                result.config[name] = bytes(b.config)
                b.mark_loaded()

    stuck = 0  # consecutive refused offers
    while not all(ended):
        live = [i for i in range(len(streams)) if not ended[i]]
        i = rng.choice(live)
        f = framers[i]
        ev = pending[i]
        if ev is None:
            ev = f.next_event()
        if ev is core.NEED_DATA:
            n = rng.randint(1, max_slice)
            chunk = streams[i][pos[i] : pos[i] + n]
            pos[i] += len(chunk)
            f.feed(chunk)
            continue
        if isinstance(ev, core.ChannelEnd):
            ended[i] = True
            continue
        if isinstance(ev, core.PacketHeader):
            b = bufs[f"{ev.idstr}/{ev.instance}"]
            if not b.offer(ev.version, ev.idx, ev.flags, ev.size):
                pending[i] = ev
                result.parked += 1
                stuck += 1
                if stuck > 200 * len(streams):
                    raise AssertionError("every channel parked: deadlock")
                continue
            pending[i] = None
            stuck = 0
            data = bytearray()
            while len(data) < ev.size:
                taken = f.take_payload() if not data else None
                if taken is not None:
                    data += taken
                    break
                out = bytearray(ev.size - len(data))
                got = f.read_payload_into(memoryview(out))
                data += out[:got]
                if len(data) < ev.size:
                    n = rng.randint(1, max_slice)
                    chunk = streams[i][pos[i] : pos[i] + n]
                    pos[i] += len(chunk)
                    f.feed(chunk)
            b.deliver(ev.idx, bytes(data))
            result.peak_queued = max(result.peak_queued, bud.queued)
            drain()
    drain()
    return result
