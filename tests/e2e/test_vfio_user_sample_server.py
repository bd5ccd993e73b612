"""libvfio-user's own ``samples/client`` against our port of its ``samples/server``.

The client drives the whole protocol (VERSION, device/region/IRQ info, the sparse-mmap
fd, DMA_MAP with fds, SET_IRQS with an eventfd, DMA logging, the server's DMA_READ /
DMA_WRITE messages, DMA_UNMAP, migration through PRE_COPY and STOP_COPY) and then
migrates the device into a second server it starts itself as ``<its directory>/server
-v SOCK_migrated``: it forks, and the *parent* execs that server while the child goes on
as the client. So the ``server`` put beside the client is a wrapper that runs our example
as a child and also reaps the client's continuation (its child since the fork), writing
both exit codes where the test can read them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.libvfio_user import LibVfioUser

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vfio_user_sample_server.py"

WRAPPER = """#!{python}
import os, subprocess, sys
with open({status!r} + ".err", "w") as err:
    server = subprocess.Popen([{python!r}, {example!r}, *sys.argv[1:]], stderr=err)
codes = []
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    codes.append(("server" if pid == server.pid else "client", os.waitstatus_to_exitcode(status)))
with open({status!r}, "w") as out:
    out.writelines(f"{{who}} {{code}}\\n" for who, code in codes)
sys.exit(0 if codes and all(code == 0 for _, code in codes) else 1)
"""


def test_libvfio_user_sample_client_runs_against_the_python_sample_server(
    libvfio_user: LibVfioUser,
) -> None:
    with tempfile.TemporaryDirectory(prefix="vus", dir="/tmp") as tmp:
        work = Path(tmp)
        client = work / "client"
        shutil.copy(libvfio_user.client, client)
        status = work / "status"
        wrapper = work / "server"
        wrapper.write_text(
            WRAPPER.format(python=sys.executable, example=str(EXAMPLE), status=str(status))
        )
        wrapper.chmod(0o755)
        sock = work / "sock"
        source_log = (work / "source.err").open("w")
        source = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "-v", str(sock)],
            stdout=subprocess.PIPE,
            stderr=source_log,
            text=True,
        )
        try:
            for _ in range(200):
                if sock.exists() or source.poll() is not None:
                    break
                subprocess.run(["sleep", "0.05"], check=True)
            assert sock.exists(), source.communicate(timeout=5)
            client_run = subprocess.Popen(
                [str(client), str(sock)],
                env=libvfio_user.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its fork and our wrapper's server stay in it
            )
            try:
                stdout, stderr = client_run.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(client_run.pid, signal.SIGKILL)
                stdout, stderr = client_run.communicate()
                dest = Path(f"{status}.err")
                raise AssertionError(
                    f"client timed out:\n{stdout}\n{stderr}\n"
                    f"source:\n{(work / 'source.err').read_text()}\n"
                    f"destination:\n{dest.read_text() if dest.exists() else ''}"
                ) from None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(client_run.pid, signal.SIGKILL)
            try:
                out, _ = source.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"source server still running:\n{(work / 'source.err').read_text()}\n"
                    f"client exit {client_run.returncode}:\n{stdout}\n{stderr}"
                ) from None
        finally:
            if source.poll() is None:
                source.kill()
                source.communicate()  # reaps it and closes its stdout pipe
            source_log.close()
        err = (work / "source.err").read_text()
        dest_log = Path(f"{status}.err").read_text()
        report = f"client stdout:\n{stdout}\nclient stderr:\n{stderr}\nsource:\n{err}\ndestination:\n{dest_log}"
        assert client_run.returncode == 0, report
        assert sorted(status.read_text().split("\n")) == ["", "client 0", "server 0"], report
        assert stdout.count("client: INTx triggered!") == 2, report
        assert "client: get_dirty_bitmap: 0-0xfff\t0x1" in stdout, report  # by messages
        assert "client: get_dirty_bitmap: 0x1000-0x1fff\t0x1" in stdout, report  # by us
        assert source.returncode == 0, report
        assert out.count("doing dma io") == 1, report
        # The destination took BAR1's data straight into BAR1 (its WriteBuffer).
        assert "bytes received straight into BAR1" in dest_log, report
