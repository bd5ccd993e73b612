"""The lower bound of a benchmark run (vfiomig.bench._model.lower_bound)."""

from __future__ import annotations

import pytest

from vfiomig.bench import lower_bound

MiB = 2**20


def test_device_limited() -> None:
    b = lower_bound([100 * MiB, 50 * MiB], device_bandwidth=200 * MiB, config_seconds=0.07)
    assert b.limit == "device"
    assert b.device_seconds == pytest.approx(0.5)
    assert b.seconds == pytest.approx(0.57)


def test_link_limited_by_total_rate() -> None:
    b = lower_bound(
        [100 * MiB] * 4,
        device_bandwidth=400 * MiB,
        config_seconds=0.0,
        wire_bytes=400 * MiB,
        link_rate=200 * MiB,
    )
    assert b.limit == "link"
    assert b.seconds == pytest.approx(2.0)
    assert b.device_seconds == pytest.approx(0.25)


def test_slow_channel_sets_the_link_bound() -> None:
    # Round-robin over 4 channels: channel 0 carries a quarter at a quarter of the rate.
    b = lower_bound(
        [64 * MiB],
        device_bandwidth=None,
        config_seconds=0.01,
        channel_bytes=[16 * MiB] * 4,
        channel_rates=[4 * MiB, None, None, None],
    )
    assert b.limit == "link"
    assert b.link_seconds == pytest.approx(4.0)
    assert b.seconds == pytest.approx(4.01)


def test_slowest_of_link_and_devices_plus_config() -> None:
    b = lower_bound(
        [30 * MiB, 90 * MiB],
        device_bandwidth=30 * MiB,
        config_seconds=0.5,
        wire_bytes=120 * MiB,
        link_rate=60 * MiB,
        channel_bytes=[60 * MiB, 60 * MiB],
        channel_rates=[40 * MiB, 40 * MiB],
    )
    assert b.link_seconds == pytest.approx(2.0)
    assert b.device_seconds == pytest.approx(3.0)
    assert (b.limit, b.seconds) == ("device", pytest.approx(3.5))


def test_no_model_limit_leaves_config_only() -> None:
    b = lower_bound([MiB], device_bandwidth=None, config_seconds=0.02)
    assert (b.limit, b.seconds) == ("config", pytest.approx(0.02))
    assert lower_bound([MiB], device_bandwidth=None, config_seconds=0.0).limit == "none"
