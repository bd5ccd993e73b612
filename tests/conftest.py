"""Shared test settings: hypothesis profiles (``ci`` is the default; ``HYPOTHESIS_PROFILE=long``
for longer runs), the ``libvfio_user`` fixture (a real vfio-user peer) and the
``mtty_run`` fixture (Linux's mtty driver in a VM, a real kernel VFIO device)."""

import faulthandler
import os

import pytest
from hypothesis import HealthCheck, settings

from tests.libvfio_user import BuildUnavailable, LibVfioUser
from tests.libvfio_user import build as build_libvfio_user
from tests.mtty_vm import GuestRun, VmUnavailable, background, stop_background, summary

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def libvfio_user() -> LibVfioUser:
    """libvfio-user's library, ``samples/server`` and ``samples/client``, built once.

    Skips where ``../shared`` (the build script and the vendored source) is not beside the
    checkout; under CI (``CI`` set) that is a failure, never a skip.
    """
    try:
        return build_libvfio_user()
    except BuildUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"libvfio-user cannot be built here: {exc}")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the mtty VM now if a collected test needs it: it runs while the others do."""
    if any("mtty_run" in getattr(item, "fixturenames", ()) for item in session.items):
        background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    stop_background()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    line = summary()
    if line is not None:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def mtty_run() -> GuestRun:
    """One VM boot running tests/mtty_guest.py against the mtty driver; its report.

    Skips where ``../shared/tools/mtty-vm`` cannot run (not beside the checkout, not
    root, not Debian 12); under CI (``CI`` set) that is a failure, never a skip.
    """
    # The wait may take minutes (the first run installs packages) and has its own bound:
    # faulthandler's per-test dump (faulthandler_timeout) would only print its stacks.
    faulthandler.cancel_dump_traceback_later()
    try:
        return background().wait()
    except VmUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the mtty VM cannot run here: {exc}")
