"""The guest side of tests/vm/test_mtty.py: runs inside ``../shared/tools/mtty-vm``.

    python -m tests.mtty_guest OUTDIR

One Python process (each start costs 7-9 s under TCG) that loads the mtty sample driver,
creates mtty mdev devices, and records what happens, never judging it (the host test
holds the expectations): the uAPI trace of tests/mtty_trace.py on a device, every failure
path of the ``vfio:`` sink and source in this process (bad, short and overlong streams,
devices in the wrong state, an abort in PRE_COPY, a busy group, a wrong device name),
and two migrations between real ``vfiomig send`` / ``vfiomig receive`` processes (four
devices, two with precopy over the control channel and two in stop-copy only; a receiver
whose device refuses the stream). Devices are opened through the group/container API (this kernel has
no iommufd), one source through ``vfio:fd:N``. Only BAR0 of each device is touched: mtty
indexes its port array with the BAR number, and BAR2-BAR5 write past it.

The report goes to OUTDIR/report.json; OUTDIR must be a directory the host can read
(mtty-vm's WORKDIR/out).
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.mtty_trace import Backend, run_trace
from vfiomig._core._errors import SinkError, SourceError, VfioMigError
from vfiomig.vfio import VfioSink, VfioSource
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._device import DeviceFd
from vfiomig.vfio._uapi import MigState

MDEV_TYPES = Path("/sys/class/mdev_bus/mtty/mdev_supported_types")
#: Register offsets in BAR0 (a 16550 UART; BAR0 is port 0's registers).
UART_RX, UART_LCR, UART_MCR, UART_LSR, UART_SCR = 0, 3, 4, 5, 7
#: Seconds a migration's processes get from their start (two Python starts under TCG on a
#: busy host took 45 s; the host's bound on the whole VM run is larger).
RUN_TIMEOUT = 300

Report = dict[str, Any]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def state_name(value: int) -> str:
    return MigState(value).name if value in MigState._value2member_map_ else str(value)


class Mdev:
    """One mtty mdev device: created in sysfs, reached through its IOMMU group."""

    def __init__(self, ports: int = 1) -> None:
        self.uuid = str(uuid.uuid4())
        (MDEV_TYPES / f"mtty-{ports}" / "create").write_text(self.uuid)
        group = os.path.realpath(f"/sys/bus/mdev/devices/{self.uuid}/iommu_group")
        self.group = f"/dev/vfio/{os.path.basename(group)}"
        self.spec = f"vfio:{self.group},device={self.uuid}"

    def open(self) -> DeviceFd:
        """The device fd through the group/container API (vfiomig's own helper); the
        caller closes it (``.close()``), which releases the group for the next user."""
        dev = DeviceFd(
            path=self.group,
            fd=None,
            owned=False,
            ioctl=uapi.sys_ioctl,
            iommu_path="",
            error=SinkError,
            group_device=self.uuid,
        )
        dev.open()
        return dev

    def state(self) -> str:
        dev = self.open()
        try:
            assert dev.fd is not None
            return state_name(uapi.get_state(dev.fd))
        finally:
            dev.close()

    def set_state(self, state: MigState) -> None:
        """SET from outside any migration (a VMM's move); the data fd is dropped."""
        dev = self.open()
        try:
            assert dev.fd is not None
            fd = uapi.set_state(dev.fd, state)
            if fd >= 0:
                os.close(fd)
        finally:
            dev.close()

    def reset(self) -> None:
        dev = self.open()
        try:
            assert dev.fd is not None
            uapi.reset(dev.fd)
        finally:
            dev.close()

    def write_regs(self, scr: int, lcr: int, mcr: int, fifo: bytes) -> None:
        dev = self.open()
        try:
            assert dev.fd is not None
            for offset, value in ((UART_SCR, scr), (UART_LCR, lcr), (UART_MCR, mcr)):
                os.pwrite(dev.fd, bytes([value]), offset)
            for byte in fifo:
                os.pwrite(dev.fd, bytes([byte]), UART_RX)  # TX: into the loopback FIFO
        finally:
            dev.close()

    def read_regs(self, fifo: int) -> dict[str, Any]:
        """SCR, LCR, MCR, LSR and ``fifo`` bytes of the loopback FIFO (reading RX pops)."""
        dev = self.open()
        try:
            assert dev.fd is not None
            fd = dev.fd
            regs: dict[str, Any] = {
                name: os.pread(fd, 1, offset)[0]
                for name, offset in (("scr", UART_SCR), ("lcr", UART_LCR), ("mcr", UART_MCR))
            }
            regs["lsr"] = os.pread(fd, 1, UART_LSR)[0]
            regs["fifo"] = bytes(os.pread(fd, 1, UART_RX)[0] for _ in range(fifo)).hex()
            return regs
        finally:
            dev.close()


class Kmsg:
    """The arcs mtty's dev_dbg logs (``mtty_step_state: CUR -> NEW``), per device."""

    _STEP = re.compile(r"mtty_step_state: (\d+) -> (\d+)")

    def __init__(self, device: str) -> None:
        self.device = device
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def arcs(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                record = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten: keep reading
                    continue
                raise
            match = self._STEP.search(record)
            if match and self.device in record:
                a, b = (state_name(int(x)) for x in match.groups())
                out.append(f"{a}->{b}")


def section(report: Report, name: str, fn: Callable[[], Any]) -> None:
    """Run one part; its result, or the traceback that stopped it, goes in the report."""
    start = time.monotonic()
    try:
        report[name] = fn()
    except Exception:
        report[name] = {"crashed": traceback.format_exc()}
    report.setdefault("seconds", {})[name] = round(time.monotonic() - start, 1)


# -- the uAPI trace ------------------------------------------------------------------------


def trace() -> Any:
    mdev = Mdev()
    kmsg = Kmsg(mdev.uuid)
    held: list[DeviceFd] = []

    def open_device() -> int:
        dev = mdev.open()
        held.append(dev)
        assert dev.fd is not None
        return os.dup(dev.fd)  # run_trace closes its fd; the group stays ours until done

    backend = Backend(uapi.sys_ioctl, os.read, os.write, open_device, kmsg.arcs)
    try:
        return run_trace(backend)
    finally:
        for dev in held:
            dev.close()


# -- failure paths in this process -------------------------------------------------------


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, VfioMigError):
        return {"message": str(exc), "errno": getattr(exc, "errno", None)}
    return {"message": f"{type(exc).__name__}: {exc}", "errno": None}


async def _save(mdev: Mdev) -> bytes:
    """The device's whole stream in STOP_COPY, then back to RUNNING by hand."""
    source = VfioSource.open(mdev.group, device=mdev.uuid)
    try:
        await source.start()
        data = b""
        while chunk := await source.read(4096):
            data += chunk
        await source.finish()
    finally:
        await source.aclose()
    mdev.set_state(MigState.RUNNING)
    return data


async def _load(mdev: Mdev, chunks: list[bytes]) -> dict[str, Any]:
    sink = VfioSink.open(mdev.group, device=mdev.uuid)
    out: dict[str, Any] = {}
    try:
        await sink.start()
        for chunk in chunks:
            await sink.write([chunk])
        await sink.finish()
        out["error"] = None
    except SinkError as exc:
        out.update(error=_error(exc))
        await sink.abort()
    finally:
        await sink.aclose()
    out["state_after"] = mdev.state()
    return out


async def _failures() -> dict[str, Any]:
    out: dict[str, Any] = {}
    src, dst = Mdev(), Mdev()
    src.write_regs(scr=0x5A, lcr=0x03, mcr=0x01, fifo=b"ok")
    stream = await _save(src)
    out["stream_size"] = len(stream)
    bad = bytes([stream[0] ^ 0xFF]) + stream[1:]
    out["bad_stream"] = await _load(dst, [bad])
    out["short_stream"] = await _load(dst, [stream[:50]])
    out["overlong_stream"] = await _load(dst, [stream + b"\0"])
    out["good_stream_after_them"] = await _load(dst, [stream[:10], stream[10:]])
    out["good_stream_regs"] = dst.read_regs(fifo=2)

    # A device in RESUMING or STOP_COPY before the migration: someone else's session.
    dst.set_state(MigState.RESUMING)
    out["sink_wrong_state"] = await _load(dst, [stream])
    dst.reset()
    src.set_state(MigState.STOP_COPY)
    source = VfioSource.open(src.group, device=src.uuid)
    try:
        await source.start()
        out["source_wrong_state"] = {"error": None}
    except SourceError as exc:
        out["source_wrong_state"] = {"error": _error(exc)}
    finally:
        await source.aclose()
    out["source_wrong_state"]["state_after"] = src.state()
    src.set_state(MigState.RUNNING)

    # An abort in PRE_COPY (the receiver failed, the operator gave up): back to RUNNING.
    source = VfioSource.open(src.group, device=src.uuid)
    try:
        entered = await source.start_precopy()
        info = await source.precopy_info()
        data = await source.read_precopy(4096)
        out["abort_in_precopy"] = {
            "entered": entered,
            "info": [info.initial_bytes, info.dirty_bytes],
            "read": len(data),
        }
        await source.abort()
    finally:
        await source.aclose()
    out["abort_in_precopy"]["state_after"] = src.state()
    out["abort_in_precopy"]["regs_after"] = src.read_regs(fifo=0)

    # The group held by someone else (a VMM), and a name the group does not hold.
    holder = dst.open()
    sink = VfioSink.open(dst.group, device=dst.uuid)
    try:
        await sink.start()
        out["group_busy"] = {"error": None}
    except SinkError as exc:
        out["group_busy"] = {"error": _error(exc)}
    finally:
        await sink.aclose()
        holder.close()
    out["group_busy"]["state_after"] = dst.state()
    sink = VfioSink.open(dst.group, device=str(uuid.uuid4()))  # a name the group lacks
    try:
        await sink.start()
        out["no_such_device"] = {"error": None}
    except SinkError as exc:
        out["no_such_device"] = {"error": _error(exc)}
    finally:
        await sink.aclose()
    return out


def failures() -> Any:
    return trio.run(_failures)


# -- migrations between real processes -----------------------------------------------------


def _listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock


class Migration:
    """``vfiomig receive`` and ``vfiomig send`` started together (the receiver's listeners
    are bound here and inherited, so the sender need not wait for it), device i of the
    source side to device i of the destination side; ``send_fd_for``: that source goes
    as ``vfio:fd:N`` (its device fd opened here, through its group). `finish` waits for
    both and reports."""

    def __init__(
        self,
        pairs: list[tuple[Mdev, Mdev]],
        *,
        control: bool,
        send_fd_for: int | None = None,
        extra_send: tuple[str, ...] = (),
    ) -> None:
        self.pairs = pairs
        self.work = work = tempfile.mkdtemp(prefix="mtty-run-")
        os.mkdir(f"{work}/config")
        data = _listener(f"{work}/data")
        ctl = _listener(f"{work}/ctl") if control else None
        session = str(uuid.uuid4())
        rx = [sys.executable, "-m", "vfiomig", "receive", "--channels", "2", "--uuid", session]
        rx += ["--listen", f"fd:{data.fileno()}", "--config-out", f"{work}/config", "--json"]
        tx = [sys.executable, "-m", "vfiomig", "send", "--channels", "2", "--uuid", session]
        tx += ["--connect", f"unix:{work}/data", "--json", *extra_send]
        if ctl is not None:
            rx += ["--control", f"fd:{ctl.fileno()}"]
            tx += ["--control", f"unix:{work}/ctl"]
        else:
            rx += ["--gate", "open"]
        held: DeviceFd | None = None
        for i, (src, dst) in enumerate(pairs):
            rx += ["--device", f"mtty{i}/vfio={dst.spec}"]
            if i == send_fd_for:
                held = src.open()
                tx += ["--device", f"mtty{i}/vfio=vfio:fd:{held.fd}"]
            else:
                tx += ["--device", f"mtty{i}/vfio={src.spec}"]
        pass_rx = [data.fileno()] + ([ctl.fileno()] if ctl is not None else [])
        pass_tx = [held.fd] if held is not None and held.fd is not None else []
        self.start = time.monotonic()
        pipe = subprocess.PIPE
        self.receiver = subprocess.Popen(rx, stdout=pipe, stderr=pipe, pass_fds=pass_rx)
        self.sender = subprocess.Popen(tx, stdout=pipe, stderr=pipe, pass_fds=pass_tx)
        data.close()
        if ctl is not None:
            ctl.close()
        if held is not None:
            held.close()  # the sender has its copy; ours closed, the group is free after it

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, proc in (("send", self.sender), ("receive", self.receiver)):
            try:
                left = self.start + RUN_TIMEOUT - time.monotonic()
                stdout, stderr = proc.communicate(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                stderr += b"\n(killed: timeout)"
            out[name] = {
                "rc": proc.returncode,
                "stdout": stdout.decode(errors="replace"),
                "stderr": stderr.decode(errors="replace"),
            }
        out["seconds"] = round(time.monotonic() - self.start, 1)
        out["states"] = [[src.state(), dst.state()] for src, dst in self.pairs]
        out["configs"] = sorted(os.listdir(f"{self.work}/config"))
        return out


def migrations() -> Any:
    """Two migrations, one after the other (each Python start costs 7-9 s of CPU under
    TCG: side by side they only share the two vCPUs). The first moves four devices, two
    with precopy (RUNNING: PRE_COPY offered) and two in stop-copy only (stopped before:
    a source in STOP goes straight to STOP_COPY), one of them as ``vfio:fd:N``; the
    second has a receiver whose device refuses the stream."""
    pairs = [(Mdev(), Mdev()) for _ in range(4)]
    expected = []
    for i, (src, _) in enumerate(pairs):
        fifo = f"s{i}".encode()
        src.write_regs(scr=0x40 + i, lcr=0x03 + i, mcr=0x08 | i, fifo=fifo)
        expected.append({"scr": 0x40 + i, "lcr": 0x03 + i, "mcr": 0x08 | i, "fifo": fifo.hex()})
    for src, _ in pairs[2:]:
        src.set_state(MigState.STOP)
    before = [dst.read_regs(fifo=0) for _, dst in pairs]
    threshold = ("--precopy-threshold", "0")
    out = {"several": Migration(pairs, control=True, send_fd_for=3, extra_send=threshold).finish()}
    out["several"]["expected_regs"] = expected
    out["several"]["dst_regs_before"] = before
    out["several"]["dst_regs"] = [d.read_regs(fifo=2) for _, d in pairs]

    # A receiver whose device refuses the stream: a 2-port mtty takes no 1-port state.
    src, dst = Mdev(), Mdev(ports=2)
    src.write_regs(scr=0x77, lcr=0x03, mcr=0x00, fifo=b"")
    out["refused"] = Migration([(src, dst)], control=True, extra_send=threshold).finish()
    out["refused"]["src_regs"] = src.read_regs(fifo=0)
    return out


def main(outdir: str) -> int:
    report: Report = {"kernel": os.uname().release}
    # Whether the senders started here can take the C send path (their interpreter and
    # environment are this one's): a ``vfio:`` device's data fd is then read by a C thread.
    from vfiomig import _core

    report["c_send_path"] = getattr(_core, "SendJob", None) is not None
    start = time.monotonic()
    for module in ("vfio", "vfio_iommu_type1", "mdev"):
        sh("modprobe", module)
    sh("insmod", os.environ["MTTY_KO"], "dyndbg=+p")
    report["seconds"] = {"setup": round(time.monotonic() - start, 1)}
    section(report, "trace", trace)
    section(report, "failures", failures)
    section(report, "migrations", migrations)
    report["seconds"]["total"] = round(time.monotonic() - start, 1)
    Path(outdir, "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
