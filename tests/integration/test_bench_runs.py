"""`vfiomig.bench._runner`: a run whose sender fails ends with that error, promptly, for
the multifd receiver and for the sequential baseline alike."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.libvfio_user import LibVfioUser
from vfiomig.bench import _runner
from vfiomig.bench._runner import Case, Models, run_sequential, run_vfiomig

CASE = Case(
    channels=2,
    packet_size=64 << 10,
    devices=1,
    size=1 << 20,
    order="roundrobin",
    transport="tcp",
    sink="null",
)


async def _failing_sender(job: dict[str, Any], out: dict[str, Any], clocks: Any = None) -> None:
    await trio.sleep(0.05)  # the receiver is listening; nothing ever connects
    raise RuntimeError("sender exited 1: boom")


@pytest.mark.parametrize("run", [run_vfiomig, run_sequential])
async def test_a_failed_sender_fails_the_run(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    monkeypatch.setattr(_runner, "_sender", _failing_sender)
    with trio.fail_after(10):
        result = await run(CASE, Models(), 0, 1, lambda done, total: None)
    assert not result.ok
    assert "RuntimeError: sender exited 1: boom" in result.error


def _vu_server(lvu: LibVfioUser, out: Path) -> str:
    """benchmarks/vfio_user/vu_server.c built against the fixture's libvfio-user."""
    src = Path(__file__).resolve().parents[2] / "benchmarks" / "vfio_user" / "vu_server.c"
    exe = out / "vu_server"
    subprocess.run(
        ["gcc", "-O2", "-o", str(exe), str(src), f"-I{lvu.source / 'include'}",
         f"-L{lvu.libdir}", f"-Wl,-rpath,{lvu.libdir}", "-lvfio-user"],
        check=True,
    )  # fmt: skip
    return str(exe)


@pytest.mark.parametrize("sink", ["vfio-user", "vfio-user-lvu"])
async def test_vfio_user_sinks_load_a_real_server(
    sink: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if sink == "vfio-user-lvu":
        lvu = request.getfixturevalue("libvfio_user")
        monkeypatch.setenv("VFIOMIG_LVU_SERVER", _vu_server(lvu, tmp_path))
    case = dataclasses.replace(CASE, sink=sink, devices=2, size=4 << 20)
    with trio.fail_after(60):
        result = await run_vfiomig(case, Models(), 0, 1, lambda done, total: None)
    assert result.ok, result.error


def test_the_libvfio_user_sink_is_skipped_when_its_server_is_not_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VFIOMIG_LVU_SERVER", "/nonexistent/vu_server")
    cases, skipped = _runner.expand([2], [1 << 20], [1], [4 << 20], ["roundrobin"], ["tcp"],
                                    ["null", "vfio-user-lvu"])  # fmt: skip
    assert [c.sink for c in cases] == ["null"]
    assert "libvfio-user's server is not built" in skipped[0][1]
