"""`vfiomig.bench._advice`: a recommendation only where the difference beats the spread,
with its confidence, "try more channels" at the edge of what was tested, and what limits
the answer (a model, a process's CPU, contention, the sender)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.bench_summaries import summary
from vfiomig.bench._advice import (
    LIMITS,
    advice_lines,
    advise,
    limit,
    mann_whitney_p,
    needs_more,
)
from vfiomig.bench._report import COLUMNS


def test_mann_whitney_exact() -> None:
    # Every one of 3 below every one of 3: one ordering in C(6, 3) = 20.
    assert mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(1 / 20)
    assert mann_whitney_p([4, 5, 6], [1, 2, 3]) == pytest.approx(1.0)
    assert mann_whitney_p([1, 1, 1], [1, 1, 1]) == pytest.approx(1.0)
    # 6 vs 6 fully separated: 1 / C(12, 6).
    assert mann_whitney_p(list(range(6)), list(range(10, 16))) == pytest.approx(1 / 924)
    # Above 16 values, the normal approximation: still small when separated.
    assert mann_whitney_p(list(range(9)), list(range(20, 29))) < 0.001
    assert math.isnan(mann_whitney_p([], [1.0]))


def test_an_answer_says_how_sure() -> None:
    rows = [
        summary("vfiomig", c, d, spread=0.04)
        for c, d in ((1, 1.0), (2, 0.52), (4, 0.30), (8, 0.29))
    ]
    (a,) = advise(rows, cpus=2)
    # 8 channels are within 5 % and within the spread of 4: the answer is 4, and 4 beat 2
    # in every repeat.
    assert (a.channels, a.verdict, a.best) == (4, "within noise: best", 8)
    assert a.p_value == pytest.approx(0.05)
    assert "best 8 channels 290 ms (284-296), but their ranges overlap (p = " in a.text
    assert "4 channels, 300 ms (294-306)" in a.text
    assert "faster than 2 channels 520 ms (510-530) beyond the spread" in a.text
    assert not a.try_more  # 8 is the best, but 4 reach it: the curve is flat there
    clear = advise(rows[:3], cpus=2)[0]
    assert (clear.channels, clear.verdict, clear.p_value) == (4, "clear", pytest.approx(0.05))
    lines = advice_lines([a])
    assert lines[0].startswith("How many channels")
    assert all(len(ln) <= 100 for ln in lines)


def test_the_issues_example_is_within_noise() -> None:
    # Null sink: 6 channels 221 ms, 1 channel 235 ms, 2 channels slower than 1, repeats
    # that overlap: no count beats another beyond the spread.
    rows = [
        summary("vfiomig", 1, 0.235, downtimes=[0.214, 0.235, 0.256], bound_limit="config"),
        summary("vfiomig", 2, 0.250, downtimes=[0.226, 0.250, 0.262], bound_limit="config"),
        summary("vfiomig", 6, 0.221, downtimes=[0.210, 0.221, 0.240], bound_limit="config"),
    ]
    (a,) = advise(rows, cpus=2)
    assert (a.channels, a.verdict, a.best) == (1, "within noise: best", 6)
    assert "1 channel, 235 ms (214-256)" in a.text  # singular
    assert "within noise: fewest channels that reach the best" in a.text
    assert a.p_value > 0.05
    assert needs_more(rows)  # 1 vs 6 differ by 6 % and the spread hides it


def test_within_noise_of_the_bound() -> None:
    rows = [
        summary("vfiomig", 1, 1.0, spread=0.1, bound=0.99),
        summary("vfiomig", 2, 0.98, spread=0.1, bound=0.97),
    ]
    (a,) = advise(rows, cpus=2)
    assert (a.channels, a.verdict) == (1, "within noise: bound")
    assert "fewest channels that reach the bound" in a.text


def test_try_more_channels_when_the_best_is_the_largest() -> None:
    rows = [
        summary("vfiomig", c, d, spread=0.02, bound_limit="link", bound=d * 0.5)
        for c, d in ((1, 1.0), (2, 0.5), (4, 0.25))
    ]
    (a,) = advise(rows, cpus=2)
    assert a.channels == 4 and a.try_more
    assert "try more channels (--channels 4,8,16)" in a.text
    # Bound by one link rate for all channels, more channels cannot help.
    at_bound = [
        summary("vfiomig", c, d, spread=0.02, bound_limit="link", bound=d * 0.95)
        for c, d in ((1, 1.0), (2, 0.5), (4, 0.25))
    ]
    assert advise(at_bound, cpus=2, link_rate=2**30)[0].try_more is False
    assert advise(at_bound, cpus=2)[0].try_more  # a rate per channel: more links


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"bound": 0.95}, "device"),
        ({"bound": 0.95, "bound_limit": "link"}, "link"),
        ({"rx": 0.95}, "receiver CPU"),
        ({"tx": 0.97}, "sender CPU"),
        ({"rx": 0.9, "tx": 0.9}, "both CPUs"),
        ({"tx_span": 0.97}, "waiting"),  # still sending, but the receiver never starved
        ({}, "waiting"),
    ],
)
def test_what_limits_a_cell(kw: dict[str, Any], what: str) -> None:
    row = summary("vfiomig", 4, 1.0, **({"bound": 0.5} | kw))
    got, why = limit(row, cpus=2)
    assert got == what, why


def test_contention_and_a_starved_receiver() -> None:
    row = summary("vfiomig", 4, 1.0, bound=0.5, tx=0.3)
    row["tx_wanted"] = {"min": 0.95, "median": 0.95, "max": 0.95}  # ran 30 %, waited 65 %
    got, why = limit(row, cpus=2)
    assert got == "contention" and "waited 65%" in why
    slow = summary("vfiomig", 4, 1.0, bound=0.5, tx_span=0.97, starved=0.7)
    assert limit(slow, cpus=2)[0] == "sender rate"
    # Starved, but the receiver itself was busy: not the sender's fault alone.
    busy = summary("vfiomig", 4, 1.0, bound=0.5, tx_span=0.97, starved=0.7, rx=0.6)
    assert limit(busy, cpus=2)[0] == "waiting"


def test_every_limit_fits_the_tables_column() -> None:
    width = dict(COLUMNS)["limit"]
    assert all(len(name) <= width for name in LIMITS)


def test_more_repeats_only_where_the_spread_hides_the_answer() -> None:
    tight = [summary("vfiomig", c, 1.0 / c, spread=0.02) for c in (1, 2, 4)]
    assert not needs_more(tight)
    wide = [summary("vfiomig", c, 1.0 / c, spread=0.3) for c in (1, 2, 4)]
    assert needs_more(wide)
