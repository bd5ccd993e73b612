"""libvfio-user (Nutanix's C reference) as a real vfio-user peer for the tests.

`build()` runs ``../shared/tools/build-libvfio-user`` (beside the checkout) once per machine
into a cache directory keyed by the vendored tarball, and returns where its library,
``samples/server`` and ``samples/client`` are. The ``libvfio_user`` fixture in
``tests/conftest.py`` wraps it: it skips only where the build cannot run, and never under
CI (``CI=true``), where a missing peer is a failure.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vfiomig.transport import unix_socket_listening

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SCRIPT = SHARED / "tools" / "build-libvfio-user"
TARBALL = SHARED / "vendor" / "libvfio-user-7e7a0a6.tar.gz"


@dataclass(frozen=True, slots=True)
class LibVfioUser:
    """Paths of a libvfio-user build."""

    libdir: Path
    server: Path
    client: Path
    source: Path

    def sample_server(self, sock: Path) -> subprocess.Popen[str]:
        """Start ``samples/server -v SOCK`` (its log on stdout) and wait until it listens."""
        proc = subprocess.Popen(
            [str(self.server), "-v", str(sock)],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 10
        while not unix_socket_listening(str(sock)):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, _ = proc.communicate(timeout=5)
                raise AssertionError(f"sample server did not start: {out}")
            time.sleep(0.01)
        return proc

    def env(self) -> dict[str, str]:
        """The environment to run its programs in (its shared library on the path)."""
        env = dict(os.environ)
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{self.libdir}:{old}" if old else str(self.libdir)
        return env


class BuildUnavailable(Exception):
    """The build cannot run on this machine (no script or tarball beside the checkout)."""


def _cache_dir() -> Path:
    digest = hashlib.sha256(TARBALL.read_bytes()).hexdigest()[:12]
    base = Path(os.environ.get("VFIOMIG_LVU_CACHE", Path.home() / ".cache" / "vfiomig"))
    return base / f"libvfio-user-{digest}"


def build() -> LibVfioUser:
    """Build libvfio-user once (cached, guarded by a lock for parallel test runs)."""
    if not SCRIPT.is_file() or not TARBALL.is_file():
        raise BuildUnavailable(f"{SCRIPT} or {TARBALL} not found")
    dest = _cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    done = dest / "built"
    with open(dest / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            out = subprocess.run(
                ["bash", str(SCRIPT), str(dest)],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(
                    f"build-libvfio-user failed (exit {out.returncode}):\n{out.stdout}{out.stderr}"
                )
            done.write_text(out.stdout)
        fields = dict(line.split("=", 1) for line in done.read_text().splitlines() if "=" in line)
    lvu = LibVfioUser(
        libdir=Path(fields["LIBDIR"]),
        server=Path(fields["SERVER"]),
        client=Path(fields["CLIENT"]),
        source=dest / "libvfio-user",
    )
    for path in (lvu.server, lvu.client):
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"{path} missing after the build; remove {done} to rebuild")
    return lvu
