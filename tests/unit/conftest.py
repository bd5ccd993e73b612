"""Core tests run against every implementation of the sans-IO core."""

from __future__ import annotations

import types

import pytest

import vfiomig._core as core_module


@pytest.fixture(params=sorted(core_module.IMPLEMENTATIONS))
def core(request: pytest.FixtureRequest) -> types.ModuleType:
    """The core implementation under test: each of ``vfiomig._core.IMPLEMENTATIONS``."""
    impl: types.ModuleType = core_module.IMPLEMENTATIONS[request.param]
    return impl
