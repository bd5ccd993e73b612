"""The bench's defaults answer "how many channels", and say so the same way everywhere:
the help states what `plan` applies, the table's header and bench.json name the models,
the table fits 100 columns and counts are written with their plural right."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest

from tests.bench_summaries import summary
from vfiomig.bench._plan import (
    MATRIX_CHANNEL_RATE,
    QEMU_DEVICE_BW,
    QEMU_TIME_SCALE,
    describe_models,
    plan,
    plural,
)
from vfiomig.bench._report import WIDTH, table
from vfiomig.cli._main import build_parser
from vfiomig.cli._options import size


def _args(*extra: str) -> Any:
    return build_parser().parse_args(["bench", *extra])


def _help(flag: str) -> str:
    bench = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["bench"]
    action = next(a for a in bench._actions if flag in a.option_strings)
    return action.help or ""


def test_default_matrix_is_where_channels_matter() -> None:
    p = plan(_args())
    assert not p.skipped and p.scale == 1.0
    assert {c.channels for c in p.cases} == {1, 2, 4, 8}
    assert {c.sink for c in p.cases} == {"null", "device"}
    assert {c.devices for c in p.cases} == {1, 2}
    assert len(p.cases) == 16
    # The device model runs at the qemu scenario's per-device bandwidth, and one channel
    # (the link model) carries less than one device takes: channel count matters.
    assert p.models.device_bandwidth == pytest.approx(QEMU_DEVICE_BW / QEMU_TIME_SCALE)
    assert p.models.channel_rate == MATRIX_CHANNEL_RATE < p.models.device_bandwidth
    assert p.repeats == (3, 6)  # auto: 3, up to --max-repeats
    assert plan(_args("--repeats", "2")).repeats == (2, 2)


def test_channel_rate_zero_means_unpaced_and_qemu_is_unpaced() -> None:
    assert plan(_args("--channel-rate", "0")).models.channel_rate is None
    p = plan(_args("--scenario", "qemu"))
    assert p.models.channel_rate is None and p.scale == QEMU_TIME_SCALE
    assert {c.channels for c in p.cases} == {1, 6, 8, 15} and {c.devices for c in p.cases} == {4}


def _said(flag: str) -> str:
    found = re.search(r"default:? ([^\s;,(]+(?:,\w+)*)", _help(flag))
    assert found, f"{flag}: no default in {_help(flag)!r}"
    return found.group(1)


def test_the_help_says_the_defaults_the_matrix_applies() -> None:
    p = plan(_args())
    assert [int(c) for c in _said("--channels").split(",")] == sorted({c.channels for c in p.cases})
    assert [int(d) for d in _said("--devices").split(",")] == sorted({c.devices for c in p.cases})
    assert _said("--sinks").split(",") == ["null", "device"]
    assert {size(_said("--size"))} == {c.size for c in p.cases}
    assert {size(_said("--packet-sizes"))} == {c.packet_size for c in p.cases}
    assert float(_said("--config-time")) == p.models.config_seconds
    # The hidden pacing that made the old help wrong ("default: unpaced").
    assert size(_said("--channel-rate")) == p.models.channel_rate
    assert "unpaced in the qemu scenario" in _help("--channel-rate")
    bw = re.search(r"= ([\d.]+)M", _help("--device-bw"))
    assert bw and float(bw.group(1)) == round(p.models.device_bandwidth / 2**20, 1)


def test_the_models_in_words() -> None:
    p = plan(_args())
    link, rest = describe_models(p.models, {"null", "device"})
    assert link == "link: 32 MiB/s per channel, no total limit"
    assert rest.startswith("device: 84.5 MiB/s, 20 us per write; config load 10 ms per device")
    unpaced = plan(_args("--channel-rate", "0", "--link-rate", "1G", "--sinks", "null"))
    link, rest = describe_models(unpaced.models, {"null"})
    assert link == "link: unpaced per channel, 1024 MiB/s in all"
    assert rest.startswith("device: none (sinks null)")
    assert (plural(1, "channel"), plural(2, "channel")) == ("1 channel", "2 channels")


def test_the_table_fits_100_columns_and_names_its_models() -> None:
    rows = [
        summary("vfiomig", c, 12.345 + c, sink="vfio-user-lvu", devices=d, order="idx0-last",
                transport="unix", spread=0.4, limit="receiver CPU")
        for d in (1, 16) for c in (1, 15, 128)
    ]  # fmt: skip
    rows.append(summary("seq", 1, 99.0, sink="vfio-user-lvu", devices=16, transport="unix"))
    rows[0]["ok"] = 1  # a failed repeat shows in the limit column
    header = ["models: " + m for m in describe_models(plan(_args()).models)]
    text = table(rows, header)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= WIDTH, max(lines, key=len)
    assert lines[0] == "models: link: 32 MiB/s per channel, no total limit"
    assert "FAILED 2/3" in text
    sections = [ln for ln in lines if ln.startswith("vfio-user-lvu sink")]
    assert sections == [
        "vfio-user-lvu sink, 1 device x 16M, 1M packets, idx0-last, unix",
        "vfio-user-lvu sink, 16 devices x 16M, 1M packets, idx0-last, unix",
    ]
    # The sequential baseline heads the section it is the baseline of.
    i = lines.index(sections[1])
    assert lines[i + 2].split()[:2] == ["seq", "1"]
    assert "13.3 (10.7-16.0)" in text  # median (min-max), in s: a run took 10 s or more
    assert "downtime s" in text
