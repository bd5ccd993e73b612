"""Summary rows as `vfiomig.bench._report.summarise` makes them, for the bench's unit
tests (advice, table, plots) without running anything."""

from __future__ import annotations

from typing import Any


def _stat(lo: float, mid: float, hi: float) -> dict[str, float]:
    return {"min": lo, "median": mid, "max": hi}


def summary(
    kind: str,
    channels: int,
    downtime: float,
    *,
    downtimes: list[float] | None = None,
    spread: float = 0.0,
    bound: float | None = None,
    bound_limit: str = "device",
    rx: float = 0.3,
    tx: float = 0.3,
    tx_span: float = 0.5,
    starved: float = 0.0,
    limit: str = "",
    **case: Any,
) -> dict[str, Any]:
    """A summary of ``kind`` at ``channels`` with median ``downtime`` seconds: three
    repeats at ``downtime`` x (1 - spread/2, 1, 1 + spread/2) unless ``downtimes``."""
    ds = sorted(downtimes or [downtime * (1 - spread / 2), downtime, downtime * (1 + spread / 2)])
    mid = ds[len(ds) // 2] if len(ds) % 2 else (ds[len(ds) // 2 - 1] + ds[len(ds) // 2]) / 2
    base: dict[str, Any] = {"sink": "device", "devices": 2, "packet_size": 2**20}
    base |= {"order": "roundrobin", "transport": "tcp", "size": 16 * 2**20} | case
    b = downtime * 0.8 if bound is None else bound
    state = base["size"] * base["devices"]
    out: dict[str, Any] = {
        "kind": kind,
        "channels": channels,
        "runs": len(ds),
        "ok": len(ds),
        "errors": [],
        **base,
        "bound_limit": bound_limit,
        "downtimes": ds,
        "downtime": _stat(ds[0], mid, ds[-1]),
        "bound": _stat(b, b, b),
        "throughput": _stat(state / ds[-1], state / mid, state / ds[0]),
        "efficiency": _stat(b / ds[-1], b / mid, b / ds[0])
        if bound_limit in ("device", "link")
        else _stat(float("nan"), float("nan"), float("nan")),
        "peak_queued_bytes": _stat(0, 2**20, 2**21),
        "starved_seconds": _stat(0, 0, 0),
        "cpu_seconds": _stat(rx * mid, rx * mid, rx * mid),
        "harness_fraction": _stat(0, 0.001, 0.002),
        "rx_busy": _stat(rx, rx, rx),
        "rx_wanted": _stat(rx, rx, rx),
        "tx_busy": _stat(tx, tx, tx),
        "tx_wanted": _stat(tx, tx, tx),
        "tx_span": _stat(tx_span, tx_span, tx_span),
        "starved_share": _stat(starved, starved, starved),
    }
    if limit:
        out["limit"] = limit
    return out
