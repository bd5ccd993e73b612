"""The C core: CI refuses a silent fallback, and the core tests pass under ASan/UBSan.

The sanitizer run builds the extension with VFIOMIG_SANITIZE=1 into a temporary copy of
the package and runs the framer's tests (both implementations) against it with libasan
preloaded, so any heap overflow, use after free or undefined behaviour in native/ fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vfiomig._core as core

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VFIOMIG_")} | env
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=60
    )


def test_required_native_core_is_in_use() -> None:
    if os.environ.get("VFIOMIG_REQUIRE_NATIVE") == "1":
        assert core.IMPLEMENTATION == "native"
        assert set(core.IMPLEMENTATIONS) == {"python", "native"}
    assert core.IMPLEMENTATIONS["python"].Framer.__module__ == "vfiomig._core._framer"


def test_missing_native_core_fails_when_required() -> None:
    block = "import sys; sys.modules['vfiomig._native'] = None; import vfiomig._core as c; "
    r = _run(block + "print(c.IMPLEMENTATION)", VFIOMIG_REQUIRE_NATIVE="1")
    assert r.returncode != 0
    assert "VFIOMIG_REQUIRE_NATIVE=1 but the C core vfiomig._native cannot be imported" in r.stderr
    # Without the requirement a missing core falls back to Python, and says so.
    r = _run(block + "print(c.IMPLEMENTATION)")
    assert r.returncode == 0 and r.stdout.strip() == "python"


def test_purepython_forces_the_reference() -> None:
    r = _run("import vfiomig._core as c; print(c.IMPLEMENTATION)", VFIOMIG_PUREPYTHON="1")
    assert r.stdout.strip() == "python", r.stderr


def _libasan() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_core_tests_pass_under_asan_and_ubsan(tmp_path: Path) -> None:
    asan = _libasan()
    if asan is None:
        if os.environ.get("VFIOMIG_REQUIRE_NATIVE") == "1":
            pytest.fail("gcc with AddressSanitizer is needed for the sanitizer run")
        pytest.skip("no gcc with AddressSanitizer")
    pkg = tmp_path / "site"
    shutil.copytree(ROOT / "vfiomig", pkg / "vfiomig", ignore=shutil.ignore_patterns("*.so"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VFIOMIG_")}
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(pkg),
         "--build-temp", str(tmp_path / "obj")],
        cwd=ROOT, env=env | {"VFIOMIG_SANITIZE": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert list((pkg / "vfiomig").glob("_native*.so"))
    run_env = env | {
        "PYTHONPATH": str(pkg),
        "LD_PRELOAD": asan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "VFIOMIG_REQUIRE_NATIVE": "1",
    }
    tests = [
        str(ROOT / "tests" / "unit" / t)
        for t in (
            "test_framer.py",
            "test_reorder.py",
            "test_pump.py",
            "test_pipe_writer.py",
            "test_blocks.py",
            "test_run.py",
        )
    ]
    # The fuzz corpus too: the framer target runs the C core beside the reference on it.
    tests.append(str(ROOT / "tests" / "unit" / "test_fuzz.py") + "::test_corpus_replays_clean")
    check = (
        "import vfiomig._native as n, sys; sys.exit(0 if n.__file__.startswith(sys.argv[1]) else 3)"
    )
    r = subprocess.run([sys.executable, "-c", check, str(pkg)], env=run_env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, f"sanitized build not the one imported: {r.stderr[-2000:]}"
    # pyproject's pythonpath ["."] and the default prepend import mode would put the
    # worktree (and its unsanitized build) first on sys.path: the sanitized copy goes first,
    # the worktree last, and one more test checks the tests ran against the copy.
    in_use = tmp_path / "test_sanitized_build_in_use.py"
    in_use.write_text(
        "import vfiomig._native as n\n\n\ndef test_sanitized_build_in_use() -> None:\n"
        f"    assert n.__file__.startswith({str(pkg)!r}), n.__file__\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
         "-c", str(ROOT / "pyproject.toml"), "-o", f"pythonpath={pkg}", "--import-mode=append",
         str(in_use), *tests],
        env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "[native]" in r.stdout or "passed" in r.stdout
