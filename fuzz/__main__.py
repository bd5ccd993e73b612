"""``python -m fuzz [TARGET...] --seconds N [--seed S] [--engine auto|atheris|mutate]
[--sanitize] [--make-corpus]``: fuzz vfiomig's decoders; exit 1 when a target crashed.

Each crash is written to fuzz/crashes/<target>-<sha1> for replay with ``--replay FILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRASHES = ROOT / "fuzz" / "crashes"


def _sanitized_env(tmp: Path) -> dict[str, str]:
    """Build the C core with ASan/UBSan into ``tmp`` and return the environment to use it."""
    cc = shutil.which("gcc") or "gcc"
    asan = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    libasan = asan.stdout.strip()
    if not os.path.isabs(libasan):
        sys.exit("gcc with AddressSanitizer is needed for --sanitize")
    pkg = tmp / "site"
    shutil.copytree(ROOT / "vfiomig", pkg / "vfiomig", ignore=shutil.ignore_patterns("*.so"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VFIOMIG_")}
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(pkg),
         "--build-temp", str(tmp / "obj")],
        cwd=ROOT, env=env | {"VFIOMIG_SANITIZE": "1"}, check=True, capture_output=True,
    )  # fmt: skip
    return env | {
        "PYTHONPATH": f"{pkg}{os.pathsep}{ROOT}",
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "VFIOMIG_REQUIRE_NATIVE": "1",
    }


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _run_atheris(target: str, seconds: int, seed: int) -> int:
    """Run one target under libFuzzer (atheris) in a child process; return its status."""
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    CRASHES.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "fuzz._atheris_child", target, str(work),
        str(ROOT / "fuzz" / "corpus" / target), f"-max_total_time={seconds}", f"-seed={seed}",
        "-max_len=65536", "-rss_limit_mb=2048", "-timeout=10",
        f"-artifact_prefix={CRASHES}/{target}-", "-print_final_stats=1",
    ]  # fmt: skip
    r = subprocess.run(args, cwd=ROOT)
    shutil.rmtree(work, ignore_errors=True)
    return r.returncode


def main(argv: list[str] | None = None) -> int:
    from fuzz.targets import TARGETS

    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    p.add_argument("targets", nargs="*", choices=[[], *TARGETS], metavar="TARGET")
    p.add_argument("--seconds", type=float, default=60.0, help="per target")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    p.add_argument("--sanitize", action="store_true", help="C core under ASan/UBSan")
    p.add_argument("--make-corpus", action="store_true", help="write the seed corpus")
    p.add_argument("--replay", metavar="FILE", help="run one input (with TARGET) and exit")
    args = p.parse_args(argv)
    targets = args.targets or list(TARGETS)

    if args.sanitize:
        with tempfile.TemporaryDirectory() as tmp:
            env = _sanitized_env(Path(tmp))
            rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--sanitize"]
            return subprocess.run(
                [sys.executable, "-m", "fuzz", *rest], env=env, cwd=ROOT
            ).returncode
    if args.make_corpus:
        from fuzz.seeds import write_corpus

        print(f"{write_corpus()} new corpus files")
        return 0
    import vfiomig._core as core

    print(f"implementations: {', '.join(core.IMPLEMENTATIONS)}", flush=True)
    if args.replay:
        TARGETS[targets[0]](Path(args.replay).read_bytes())
        print("no crash")
        return 0
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _atheris_available() else "mutate"
    status = 0
    for target in targets:
        if engine == "atheris":
            status |= _run_atheris(target, max(1, int(args.seconds)), args.seed) != 0
            continue
        from fuzz.engine import fuzz

        r = fuzz(target, TARGETS[target], seconds=args.seconds, seed=args.seed)
        print(
            f"{target:10} runs {r.runs:8} corpus {r.corpus:5} lines {r.lines:5}"
            f" crashes {len(r.crashes)} ({r.seconds:.1f} s)",
            flush=True,
        )
        for data, why in r.crashes[:5]:
            CRASHES.mkdir(parents=True, exist_ok=True)
            path = CRASHES / f"{target}-{hashlib.sha1(data).hexdigest()[:16]}"
            path.write_bytes(data)
            print(f"  crash {why[:300]} -> {path}")
        status |= bool(r.crashes)
    return status


if __name__ == "__main__":
    sys.exit(main())
