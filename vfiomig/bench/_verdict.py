"""How the QEMU-shaped scenario compares with QEMU's own published downtimes (how many
channels to use is `_advice`).

QEMU's figures (reference/qemu-multifd-vfio.md §5, v3 cover letter, 4 ConnectX-7 VFs,
~400 MiB of device state): 1900 ms over the main channel alone, 1095 / 1104 / 1125 ms
with 6 / 8 / 15 multifd channels. Their absolute values include more than device state
and another machine, so the comparison is of shape: each downtime over the same setup's
single-stream downtime (QEMU's main channel, vfiomig's sequential baseline).
"""

from __future__ import annotations

import math
from typing import Any

#: QEMU v3, 4 VFs: downtime over the main channel only (no multifd), in ms.
QEMU_MAIN_CHANNEL_MS = 1900
#: QEMU v3, 4 VFs: downtime by multifd channel count, in ms.
QEMU_DOWNTIME_MS = {6: 1095, 8: 1104, 15: 1125}
#: A channel count "reaches" the best downtime when within this fraction of it.
GOOD_ENOUGH = 0.05


def _median(s: dict[str, Any], measure: str) -> float:
    value: float = s[measure]["median"]
    return value


def qemu_table(summaries: list[dict[str, Any]], scale: float) -> tuple[list[str], dict[str, Any]]:
    """The QEMU scenario's downtimes beside QEMU's published ones, each also relative to
    its single-stream downtime; returns the lines and what goes into bench.json."""
    ours = {
        s["channels"]: _median(s, "downtime")
        for s in summaries
        if s["kind"] == "vfiomig" and s["ok"]
    }
    seq = next(
        (_median(s, "downtime") for s in summaries if s["kind"] == "seq" and s["ok"]), math.nan
    )
    head = (
        f"{'channels':>12} {'vfiomig ms':>11} {f'/ {scale:g} (time scale)':>20} {'vs single':>10}"
        f" | {'QEMU ms':>8} {'vs main ch':>10}"
    )
    lines = [
        "QEMU scenario beside QEMU's published downtimes (v3, 4 VFs; 'vs' = over the"
        " single-stream downtime: vfiomig's sequential baseline, QEMU's main channel):",
        head,
        "-" * len(head),
    ]

    def row(label: str, ms: float, qemu: int | None) -> str:
        rel = ms / (seq * 1000) if seq > 0 else math.nan
        q = f"{qemu:>8} {qemu / QEMU_MAIN_CHANNEL_MS:>10.2f}" if qemu else f"{'-':>8} {'-':>10}"
        return f"{label:>12} {ms:>11.0f} {ms / scale:>20.0f} {rel:>10.2f} | {q}"

    if not math.isnan(seq):
        lines.append(row("single", seq * 1000, QEMU_MAIN_CHANNEL_MS))
    for ch in sorted(set(ours) | set(QEMU_DOWNTIME_MS)):
        if ch in ours:
            lines.append(row(str(ch), ours[ch] * 1000, QEMU_DOWNTIME_MS.get(ch)))
        else:
            q = QEMU_DOWNTIME_MS[ch]
            lines.append(
                f"{ch:>12} {'-':>11} {'-':>20} {'-':>10} | {q:>8} {q / QEMU_MAIN_CHANNEL_MS:>10.2f}"
            )
    meta = {
        "qemu_main_channel_ms": QEMU_MAIN_CHANNEL_MS,
        "qemu_downtime_ms": QEMU_DOWNTIME_MS,
        "vfiomig_downtime_ms": {ch: v * 1000 for ch, v in ours.items()},
        "vfiomig_single_stream_ms": seq * 1000,
        "time_scale": scale,
    }
    return lines, meta


__all__ = ["QEMU_DOWNTIME_MS", "QEMU_MAIN_CHANNEL_MS", "qemu_table"]
