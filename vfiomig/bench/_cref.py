"""The C reference (``benchmarks/cref``) as a kind of run: both its ends in child
processes, where the case allows (`cref_reason`)."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from ._runner import Case, Models, Run, _listen, _timeout
from ._sinks import SHM


def load_cref() -> Any | None:
    """The C reference runner (``benchmarks/cref``) when this is a source checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "cref" / "__init__.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module("benchmarks.cref")
    except ImportError:
        return None


def cref_reason(case: Case, models: Models) -> str | None:
    """Why the C reference cannot run ``case``, or None when it can."""
    if case.sink == "device":
        return "the C reference has no device model"
    if case.sink.startswith("vfio-user"):
        return "the C reference has no vfio-user sink"
    if case.order == "slow" or models.link_rate:
        return "the C reference paces channels only at one common rate"
    return None


async def run_cref(cref: Any, case: Case, models: Models, repeat: int, seed: int) -> Run:
    run = Run("cref", case, repeat, seed)
    with tempfile.TemporaryDirectory(prefix="vfiomig-bench-", dir=SHM) as tmp:
        output = {"null": "null", "pipe": "pipe", "tmpfs": os.path.join(tmp, "dev{instance}")}
        cpu0 = os.times()
        try:
            result = await trio.to_thread.run_sync(
                lambda: cref.run_transfer(
                    channels=case.channels,
                    size=case.size,
                    packet_size=case.packet_size,
                    output=output[case.sink],
                    listen=_listen(case, tmp, "cref"),
                    order=case.order,
                    seed=seed,
                    rate=int(models.channel_rate or 0),
                    devices=case.devices,
                    drainer=["cat"] if case.sink == "pipe" else None,
                    timeout=_timeout(case, models),
                )
            )
        except (RuntimeError, OSError, ValueError) as exc:
            run.error = f"{type(exc).__name__}: {exc}"
            return run
        cpu1 = os.times()
    rx = result.receiver
    run.ok = True
    run.bytes = int(rx["bytes"])
    run.downtime = float(rx["seconds"])
    run.throughput = run.bytes / run.downtime
    run.peak_queued_bytes = int(rx.get("peak_queued_bytes", 0))
    # Children's CPU: receiver, sender and drainer together (os.times counts reaped children).
    run.cpu_seconds = (cpu1.children_user + cpu1.children_system) - (
        cpu0.children_user + cpu0.children_system
    )
    run.sender_seconds = float(result.sender.get("seconds", float("nan")))
    return run


__all__ = ["cref_reason", "load_cref", "run_cref"]
