"""How many channels, with statistics: what a bench run can say and how sure it is.

For each group of cells that differ only in their channel count (same sink, devices, size,
packet size, order, transport), on the vfiomig rows' downtimes over their repeats:

- a count is *slower than the best* when the difference beats the spread: every repeat of
  it is slower than every repeat of the best (their min-max ranges do not overlap) and its
  median is more than `GOOD_ENOUGH` above the best's (a difference that matters);
- the answer is the fewest channels not slower than the best. When that is the best
  itself, the answer is *clear*, and its confidence is the exact one-sided Mann-Whitney
  probability that noise alone orders the repeats that way against the next fewer count.
  Otherwise it is *within noise*: the fewest channels that reach the bound (when its
  fastest repeat is within `GOOD_ENOUGH` of the models' bound) or the best;
- when the answer is the largest count tested (the best, beyond the spread of every
  fewer count) and no model bounds it, more may help: *try more channels*;
- what limits the answer (`limit`): the device or link model when the run is within 10 %
  of its bound; else the receiver's or the sender's CPU when that process ran or waited for
  a CPU most of the downtime (`_cpu`), or contention when one waited for a CPU a good
  part of it; else the sender when the receiver, mostly idle, starved for data while the
  sender was still sending; else the waits between the two ends.

`needs_more` tells `--repeats auto` which groups to run again: where a difference that
would matter is hidden by the spread, or a cell's spread is wide.
"""

from __future__ import annotations

import itertools
import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ._plan import plural
from ._runner import _size

#: A count "reaches" the best (or the bound) within this fraction of it.
GOOD_ENOUGH = 0.05
#: A cell whose (max - min) / median is above this gets more repeats (``--repeats auto``).
WIDE = 0.10
#: A process that ran or waited to run this fraction of the window was CPU-bound.
SATURATED = 0.85
#: A run within this fraction of its bound is bound by the model that sets it.
AT_BOUND = 0.90

GroupKey = tuple[str, int, int, int, str, str]  # sink, devices, size, packet, order, transport


def group_key(s: dict[str, Any]) -> GroupKey:
    return (s["sink"], s["devices"], s["size"], s["packet_size"], s["order"], s["transport"])


def groups(summaries: list[dict[str, Any]]) -> dict[GroupKey, list[dict[str, Any]]]:
    """The vfiomig cells with at least one successful run, by group, fewest channels first."""
    out: dict[GroupKey, list[dict[str, Any]]] = defaultdict(list)
    for s in summaries:
        if s["kind"] == "vfiomig" and s["ok"] and s["downtimes"]:
            out[group_key(s)].append(s)
    for rows in out.values():
        rows.sort(key=lambda s: s["channels"])
    return dict(out)


def mann_whitney_p(fast: list[float], slow: list[float]) -> float:
    """The exact one-sided probability that ``fast`` looks at least this much faster than
    ``slow`` when both come from one distribution (Mann-Whitney U, ties counted half);
    a normal approximation above 16 values in all."""

    def u(a: list[float], b: list[float]) -> float:
        return sum((x > y) + 0.5 * (x == y) for x in a for y in b)

    n, m = len(fast), len(slow)
    if n == 0 or m == 0:
        return math.nan
    observed = u(fast, slow)
    if n + m > 16:
        mean, sd = n * m / 2, math.sqrt(n * m * (n + m + 1) / 12)
        return 0.5 * math.erfc((mean - observed - 0.5) / (sd * math.sqrt(2)))
    pooled = fast + slow
    hits = total = 0
    for idx in itertools.combinations(range(n + m), n):
        chosen = set(idx)
        a = [pooled[i] for i in idx]
        b = [pooled[i] for i in range(n + m) if i not in chosen]
        total += 1
        hits += u(a, b) <= observed
    return hits / total


def slower(row: dict[str, Any], best: dict[str, Any]) -> bool:
    """``row`` is slower than ``best`` beyond the spread and by a difference that matters."""
    if row is best:
        return False
    separated: bool = min(row["downtimes"]) > max(best["downtimes"])
    gap: float = row["downtime"]["median"] / best["downtime"]["median"] - 1
    return separated and gap > GOOD_ENOUGH


def spread(row: dict[str, Any]) -> float:
    """(max - min) / median of a cell's downtimes."""
    d = row["downtime"]
    return (d["max"] - d["min"]) / d["median"] if d["median"] > 0 else math.nan


def at_bound(row: dict[str, Any]) -> bool:
    """The cell's fastest repeat is within `GOOD_ENOUGH` of an informative bound."""
    eff = row["efficiency"]["max"]
    return not math.isnan(eff) and eff >= 1 - GOOD_ENOUGH


#: What can limit a cell, as the table's limit column names it (12 columns at most).
LIMITS = (
    "device",
    "link",
    "both CPUs",
    "receiver CPU",
    "sender CPU",
    "contention",
    "sender rate",
    "waiting",
    "unknown",
)
#: A process that waited for a CPU this fraction of its window was held back by others.
CONTENDED = 0.40


def limit(row: dict[str, Any], cpus: int) -> tuple[str, str]:
    """(what limits this cell, one of `LIMITS`; why we say so), from its medians: a model
    when the run is near its bound; a process's CPU when it ran or waited to run most of
    its window and ran at least half of it; contention when a process waited for a CPU
    `CONTENDED` of it (the machine was busy with other work); the sender when the
    receiver's loaders starved for data while it was still sending and the receiver was
    mostly idle; else the waits between the two ends."""
    eff = row["efficiency"]["median"]
    rx, tx = row["rx_wanted"]["median"], row["tx_wanted"]["median"]
    rx_busy, tx_busy = row["rx_busy"]["median"], row["tx_busy"]["median"]
    rx_cpu = rx >= SATURATED and rx_busy >= 0.5
    tx_cpu = tx >= SATURATED and tx_busy >= 0.5
    said = (
        f"receiver ran {rx_busy:.0%} and waited for a CPU {rx - rx_busy:.0%} of the downtime;"
        f" sender ran {tx_busy:.0%} and waited {tx - tx_busy:.0%} of its sending time"
    )
    if row["bound_limit"] in ("device", "link") and eff >= AT_BOUND:
        return row["bound_limit"], f"{eff:.0%} of the {row['bound_limit']} model's bound"
    if rx_cpu and tx_cpu:
        return "both CPUs", f"{said}; {plural(cpus, 'CPU')} here"
    if rx_cpu:
        return "receiver CPU", said
    if tx_cpu:
        return "sender CPU", said
    if max(rx - rx_busy, tx - tx_busy) >= CONTENDED:
        return "contention", f"CPU contention: {said}"
    starved, span = row["starved_share"]["median"], row["tx_span"]["median"]
    if span >= AT_BOUND and starved >= 0.5 and rx < 0.5:
        return "sender rate", (
            f"the loaders waited for data {starved:.0%} of the downtime while the sender was"
            f" still sending ({said})"
        )
    if math.isnan(rx) or math.isnan(tx):
        return "unknown", "no CPU figures (no /proc schedstat)"
    return "waiting", f"no model reached, neither end CPU-bound ({said})"


@dataclass(frozen=True, slots=True)
class Advice:
    """The answer for one group, and how it was reached."""

    sink: str
    devices: int
    size: int
    packet_size: int
    order: str
    transport: str
    channels: int  # the answer
    verdict: str  # "clear", "within noise: bound", "within noise: best", "only count"
    best: int  # the count with the lowest median downtime
    p_value: float  # the answer vs the next fewer count, else the best vs the answer
    repeats: int  # the fewest repeats behind any cell of the group
    try_more: bool
    limit: str
    limit_why: str
    text: str


def _ms(s: dict[str, Any]) -> str:
    """``81 ms (80-90)``: the median downtime and its min-max."""
    d = s["downtime"]
    ms = [round(v * 1000) for v in (d["median"], d["min"], d["max"])]
    return f"{ms[0]} ms ({ms[1]}-{ms[2]})"


def _cell(s: dict[str, Any]) -> str:
    return f"{plural(s['channels'], 'channel')} {_ms(s)}"


def advise_group(
    key: GroupKey, rows: list[dict[str, Any]], cpus: int, link_rate: float | None = None
) -> Advice:
    """The answer for one group (rows: its cells, fewest channels first). ``link_rate``:
    the models' total link rate, if any (a link-bound run then gains nothing from more
    channels; with only a rate per channel it does)."""
    best = min(rows, key=lambda s: s["downtime"]["median"])
    pick = next(s for s in rows if not slower(s, best))
    repeats = min(len(s["downtimes"]) for s in rows)
    below = [s for s in rows if s["channels"] < pick["channels"]]
    parts: list[str] = []
    p = math.nan
    if len(rows) == 1:
        verdict = "only count"
        parts.append("the only count tested")
    elif pick is best:
        verdict = "clear"
        if not below:
            parts.append("the fewest tested, and no count beats it beyond the spread")
    else:
        reach = "bound" if at_bound(pick) else "best"
        verdict = f"within noise: {reach}"
        p = mann_whitney_p(best["downtimes"], pick["downtimes"])
        overlap = min(pick["downtimes"]) <= max(best["downtimes"])
        how = "their ranges overlap" if overlap else f"the difference is under {GOOD_ENOUGH:.0%}"
        parts.append(
            f"within noise: fewest channels that reach the {reach}; best {_cell(best)}, but"
            f" {how} (p = {p:.2g} that noise alone ordered their repeats so)"
        )
    if below:
        prev = below[-1]
        p = mann_whitney_p(pick["downtimes"], prev["downtimes"])
        parts.append(
            f"faster than {_cell(prev)} beyond the spread: every repeat beat every repeat,"
            f" p = {p:.2g} that noise alone did it"
        )
    why = "; ".join(parts)
    if repeats < 2:
        why += "; 1 repeat per cell: no spread to judge by (use --repeats auto)"
    what, what_why = limit(pick, cpus)
    bounded = what == "device" or (what == "link" and bool(link_rate))
    # The answer at the largest count tested: the downtime was still falling there.
    try_more = len(rows) > 1 and pick is rows[-1] and not bounded
    sink, devices, size, packet, order, transport = key
    head = (
        f"{sink} sink, {plural(devices, 'device')} x {_size(size)}, {_size(packet)} packets,"
        f" {order}, {transport}"
    )
    text = f"{head}: {plural(pick['channels'], 'channel')}, {_ms(pick)}"
    text += f"\n    {why}\n    limit: {what} ({what_why})"
    if try_more:
        n = rows[-1]["channels"]
        text += "\n    the best is the largest count tested: try more channels (--channels"
        text += f" {n},{n * 2},{n * 4})"
    return Advice(
        *key, pick["channels"], verdict, best["channels"], p, repeats, try_more, what,
        what_why, text,
    )  # fmt: skip


def advise(
    summaries: list[dict[str, Any]], cpus: int, link_rate: float | None = None
) -> list[Advice]:
    return [advise_group(k, rows, cpus, link_rate) for k, rows in groups(summaries).items()]


def advice_lines(advice: list[Advice], width: int = 100) -> list[str]:
    """The advice for the terminal, in lines of at most ``width`` columns."""
    if not advice:
        return []
    lines = textwrap.wrap(
        "How many channels: the fewest not slower than the best beyond the spread of the"
        f" repeats and by more than {GOOD_ENOUGH:.0%}.",
        width,
    )
    for a in advice:
        for i, part in enumerate(a.text.split("\n")):
            lines += textwrap.wrap(
                part.strip(),
                width,
                initial_indent="  " if i == 0 else "    ",
                subsequent_indent="      ",
            )
    return lines


def needs_more(rows: list[dict[str, Any]]) -> bool:
    """Whether more repeats could change or firm up this group's answer: a cell looks
    different from the best by more than `GOOD_ENOUGH` but the spread hides it, or a cell's
    spread is wider than `WIDE`."""
    best = min(rows, key=lambda s: s["downtime"]["median"])
    for s in rows:
        if spread(s) > WIDE:
            return True
        gap = s["downtime"]["median"] / best["downtime"]["median"] - 1
        if s is not best and gap > GOOD_ENOUGH and not slower(s, best):
            return True
    return False


__all__ = [
    "GOOD_ENOUGH",
    "LIMITS",
    "Advice",
    "advice_lines",
    "advise",
    "advise_group",
    "group_key",
    "groups",
    "limit",
    "mann_whitney_p",
    "needs_more",
]
