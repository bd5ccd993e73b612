"""The sdist is complete: built with ``python -m build``, installed into a fresh venv outside
the checkout (pip builds the C core from the sdist's native/), and ``vfiomig demo`` runs
from there with the native core, importing nothing from the source tree.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VFIOMIG_PUREPYTHON")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-3000:]}"
    return proc


def test_sdist_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path: Path) -> None:
    if importlib.util.find_spec("build") is None:
        if os.environ.get("CI"):
            raise AssertionError("python -m build is missing: `make install` installs [dev]")
        pytest.skip("the build frontend is not installed (pip install -e '.[dev]')")
    dist = tmp_path / "dist"
    # --no-isolation: the checkout's venv already has the build requirements; the install
    # below builds the wheel from the sdist in pip's own isolated environment.
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist)], ROOT)
    (sdist,) = dist.glob("vfiomig-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"native/vfiomig_core.c", "native/vfiomig_core.h", "README.md", "LICENSE"} <= names
    assert "contrib/systemd/vfiomig-receive@.service" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    _run([*pip, str(sdist)], tmp_path, timeout=600)

    where = _run(
        [str(python), "-c", "import vfiomig; print(vfiomig.__file__, vfiomig.IMPLEMENTATION)"],
        tmp_path,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and where[1] == "native", where
    demo = _run([str(venv / "bin" / "vfiomig"), "demo", "--size", "16M"], tmp_path)
    assert demo.stdout.splitlines()[-1] == "demo: ok"
    assert demo.stdout.count("verified") == 2
