"""The matrix and the runs: one receiver in this process, the sender in a subprocess.

A run is one transfer of one `Case` by one ``kind``:

- ``vfiomig``: `serve_receiver` here, ``python -m vfiomig.bench._sendproc`` (the real
  multifd sender, `send_migration`) in a child process;
- ``seq``: the vhost-user style sequential stream (`_seq`), same arrangement;
- ``cref``: the C reference receiver and sender (``benchmarks/cref``), both children.

Downtime is measured on the receiving side, from the first packet header read to the last
device loaded (its config replayed and its sink finished). On loopback the first header is
read microseconds after it is sent; the sender's own start time is kept in the row too.

CPU per process (`_cpu`): the receiver's over the downtime, the sender's from its first
packet to its last, each with the time it spent runnable but waiting for a CPU.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import trio

from vfiomig.receive import DeviceSetup, MigrationFailed, ReceiverConfig, Session, serve_receiver

from ._cpu import NO_USAGE, ProcClock, Usage, watch
from ._model import ConfigModel, Overhead, lower_bound
from ._seq import SeqReport, serve_sequential
from ._sinks import SinkSet, open_sinks
from ._vfio_user import lvu_server

ORDERS = ("roundrobin", "random", "idx0-last", "slow")
TRANSPORTS = ("tcp", "unix")
UUID = bytes.fromhex("0123456789abcdef0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Case:
    """One cell of the matrix."""

    channels: int
    packet_size: int
    devices: int
    size: int  # state bytes per device
    order: str
    transport: str
    sink: str

    @property
    def label(self) -> str:
        return (
            f"{self.channels}ch {_size(self.packet_size)} {self.devices}dev x {_size(self.size)}"
            f" {self.order} {self.transport} {self.sink}"
        )


@dataclass(frozen=True, slots=True)
class Models:
    """The device, config and link models shared by every run of a bench."""

    device_bandwidth: float = 64 * 2**20
    write_latency: float = 20e-6
    config_seconds: float = 0.01
    channel_rate: float | None = None
    link_rate: float | None = None
    slow_rate: float = 16 * 2**20
    max_queued: int = 256 * 2**20


@dataclass(slots=True)
class Run:
    """One measured transfer (a row of the CSV)."""

    kind: str
    case: Case
    repeat: int
    seed: int
    ok: bool = False
    error: str = ""
    bytes: int = 0
    wire_bytes: int = 0
    downtime: float = float("nan")
    throughput: float = float("nan")  # state bytes per second of downtime
    bound: float = float("nan")
    bound_limit: str = ""
    efficiency: float = float("nan")
    peak_queued_bytes: int = 0
    starved_seconds: float = float("nan")
    cpu_seconds: float = float("nan")  # the receiver's, over the downtime
    cpu_wait_seconds: float = float("nan")  # the receiver runnable, waiting for a CPU
    sender_cpu_seconds: float = float("nan")  # first packet to last
    sender_wait_seconds: float = float("nan")
    sender_send_seconds: float = float("nan")  # the sender's first packet to its last
    harness_seconds: float = 0.0
    late_seconds: float = 0.0
    sender_seconds: float = float("nan")
    first_write_delay: float = float("nan")  # first packet to the device model's first write
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, **asdict(self.case)}
        for k in _ROW_FIELDS:
            out[k] = getattr(self, k)
        out["harness_fraction"] = (
            self.harness_seconds / self.downtime if self.downtime > 0 else float("nan")
        )
        return out


_ROW_FIELDS = (
    "repeat",
    "seed",
    "ok",
    "error",
    "bytes",
    "wire_bytes",
    "downtime",
    "throughput",
    "bound",
    "bound_limit",
    "efficiency",
    "peak_queued_bytes",
    "starved_seconds",
    "cpu_seconds",
    "cpu_wait_seconds",
    "sender_cpu_seconds",
    "sender_wait_seconds",
    "sender_send_seconds",
    "harness_seconds",
    "late_seconds",
    "sender_seconds",
    "first_write_delay",
)


def _size(n: int) -> str:
    for unit, k in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << k and n % (1 << k) == 0:
            return f"{n >> k}{unit}"
    return str(n)


def expand(
    channels: list[int],
    packet_sizes: list[int],
    devices: list[int],
    sizes: list[int],
    orders: list[str],
    transports: list[str],
    sinks: list[str],
) -> tuple[list[Case], list[tuple[Case, str]]]:
    """The matrix in a stable order, and the cells that cannot run (with why)."""
    cases: list[Case] = []
    skipped: list[tuple[Case, str]] = []
    for s, p, d, size, o, t, c in itertools.product(
        sinks, packet_sizes, devices, sizes, orders, transports, channels
    ):
        case = Case(c, p, d, size, o, t, s)
        if o == "idx0-last" and c < 2:
            skipped.append((case, "idx0-last needs at least 2 channels"))
        elif p > size:
            skipped.append((case, "packet size above the state size"))
        elif s == "vfio-user-lvu" and lvu_server() is None:
            skipped.append(
                (case, "libvfio-user's server is not built "
                 "(python -m benchmarks.vfio_user.bench --build-only)")
            )  # fmt: skip
        else:
            cases.append(case)
    return cases, skipped


def channel_rates(case: Case, models: Models) -> list[float | None]:
    """Each channel's rate: the link model's, with channel 0 slowed for order ``slow``."""
    rates: list[float | None] = [models.channel_rate] * case.channels
    if case.order == "slow":
        rates[0] = models.slow_rate
    return rates


def _listen(case: Case, tmp: str, name: str) -> str:
    return f"unix:{os.path.join(tmp, name)}" if case.transport == "unix" else "tcp:127.0.0.1:0"


def _devices(case: Case, seed: int) -> list[dict[str, Any]]:
    return [
        {"idstr": f"0000:00:{4 + i:02x}.0/vfio", "instance": 0, "size": case.size, "seed": seed + i}
        for i in range(case.devices)
    ]


async def _drain(stream: Any, into: list[bytes]) -> None:
    async with stream:
        while chunk := await stream.receive_some():
            into.append(chunk)


async def _sender(
    job: dict[str, Any],
    out: dict[str, Any],
    clocks: list[ProcClock] | None = None,
) -> None:
    """Run the sender process on ``job``; its JSON line goes into ``out``. With
    ``clocks``, its `ProcClock` is appended there and sampled while it lives."""
    argv = [sys.executable, "-m", "vfiomig.bench._sendproc", json.dumps(job)]
    stdout: list[bytes] = []
    stderr: list[bytes] = []
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with trio.open_nursery() as nursery:
            if clocks is not None:
                clock = ProcClock(proc.pid)
                clocks.append(clock)
                nursery.start_soon(watch, [clock])
            async with trio.open_nursery() as io:
                io.start_soon(_drain, proc.stdout, stdout)
                io.start_soon(_drain, proc.stderr, stderr)
            await proc.wait()
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:  # cancelled: the sender must not outlive its run
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    if proc.returncode != 0:
        text = b"".join(stderr).decode(errors="replace")
        raise RuntimeError(f"sender exited {proc.returncode}: {text[-400:]}")
    out.update(json.loads(b"".join(stdout).decode().strip().splitlines()[-1]))


Ticker = Callable[[int, int], None]  # (bytes landed, bytes total)


async def _tick(sinks: SinkSet, total: int, ticker: Ticker, overhead: Overhead) -> None:
    while True:
        await trio.sleep(0.25)
        t0 = time.perf_counter()
        ticker(sinks.bytes_written(), total)
        overhead.seconds += time.perf_counter() - t0


def _timeout(case: Case, models: Models) -> float:
    total = case.size * case.devices
    slowest = min(r for r in (models.device_bandwidth, models.slow_rate, 20 * 2**20) if r)
    return 60.0 + 4 * total / slowest


def _case_sinks(
    case: Case, models: Models, overhead: Overhead
) -> AbstractAsyncContextManager[SinkSet]:
    """One sink per device of ``case``, of its kind, with the models' device bandwidth."""
    return open_sinks(
        case.sink,
        case.devices,
        bandwidth=models.device_bandwidth,
        latency=models.write_latency,
        overhead=overhead,
    )


async def _transfer(
    run: Run,
    sinks: SinkSet,
    limit_seconds: float,
    ticker: Ticker,
    overhead: Overhead,
    failures: list[str],
    serve: Callable[[trio.TaskStatus[Any]], Awaitable[None]],
    job_for: Callable[[Any], dict[str, Any]],
    abort: Callable[[Any, trio.Nursery], None],
) -> tuple[dict[str, Any], list[ProcClock]]:
    """One transfer of ``run``'s case into ``sinks``: start the receiver (``serve``, which
    reports its handle through ``task_status`` and its failures into ``failures``), run the
    sender process on ``job_for(handle)``, wait for the receiver to finish. On a failed
    sender ``abort(handle, nursery)`` stops the receiver. Sets ``run.late_seconds``; returns
    the sender's report and the CPU clocks of the receiver (this process) and, when it
    started, the sender."""
    total = run.case.size * run.case.devices
    sent: dict[str, Any] = {}
    clocks = [ProcClock(os.getpid())]
    finished = trio.Event()

    async def run_server(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(task_status)
        finally:
            finished.set()

    try:
        with trio.fail_after(limit_seconds):
            async with trio.open_nursery() as nursery:
                handle = await nursery.start(run_server)
                job = job_for(handle)
                nursery.start_soon(watch, clocks[:1])
                nursery.start_soon(_tick, sinks, total, ticker, overhead)
                try:
                    await _sender(job, sent, clocks)
                except (RuntimeError, OSError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    abort(handle, nursery)
                # The sender is done; the receiver may still be loading.
                await finished.wait()
                clocks[0].sample()  # the receiver's CPU up to its end
                nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        failures.append(f"timed out after {limit_seconds:.0f} s")
    finally:
        run.late_seconds = sinks.late_seconds()
    return sent, clocks


def _set_cpu(run: Run, sent: dict[str, Any], clocks: list[ProcClock], end: float) -> None:
    """The receiver's CPU over the downtime (it ended at ``end``, trio time) and the
    sender's from its first packet to its last (CLOCK_MONOTONIC, both processes); the
    sampling during the downtime counts as harness time."""
    offset = trio.current_time() - time.monotonic()
    start = float(sent.get("t_first") or sent["t_start"])
    rx = clocks[0].usage(start, end - offset)
    run.harness_seconds += sum(c.cost(start, end - offset) for c in clocks)
    tx: Usage = clocks[1].usage(start, float(sent["t_end"])) if len(clocks) > 1 else NO_USAGE
    run.cpu_seconds, run.cpu_wait_seconds = rx.cpu, rx.wait
    run.sender_cpu_seconds, run.sender_wait_seconds = tx.cpu, tx.wait
    run.sender_send_seconds = float(sent["t_end"]) - start


async def run_vfiomig(case: Case, models: Models, repeat: int, seed: int, ticker: Ticker) -> Run:
    run = Run("vfiomig", case, repeat, seed)
    overhead = Overhead()
    rates = channel_rates(case, models)
    with tempfile.TemporaryDirectory(prefix="vfiomig-bench-") as tmp:
        async with _case_sinks(case, models, overhead) as sinks:
            devs = _devices(case, seed)
            setups = [
                DeviceSetup(d["idstr"], d["instance"], s, ConfigModel(models.config_seconds))
                for d, s in zip(devs, sinks.sinks, strict=True)
            ]
            config = ReceiverConfig(
                uuid=UUID,
                channels=case.channels,
                devices=setups,
                listen=[_listen(case, tmp, "data")],
                gate="open",
                max_queued=models.max_queued,
            )
            failures: list[str] = []
            t_serve = 0.0

            async def serve(task_status: trio.TaskStatus[Session]) -> None:
                try:
                    await serve_receiver(config, task_status=task_status)
                except MigrationFailed as exc:
                    failures.append(str(exc))

            sessions: list[Session] = []

            def job_for(session: Session) -> dict[str, Any]:
                nonlocal t_serve
                t_serve = trio.current_time()
                sessions.append(session)
                return {
                    "mode": "multifd",
                    "connect": session.bound,
                    "channels": case.channels,
                    "uuid": UUID.hex(),
                    "devices": devs,
                    "packet_size": case.packet_size,
                    "order": "roundrobin" if case.order == "slow" else case.order,
                    "seed": seed,
                    "channel_rate": models.channel_rate,
                    "channel_rates": rates,
                    "link_rate": models.link_rate,
                }

            def abort(session: Session, nursery: trio.Nursery) -> None:
                session.abort("the sender failed")

            sent, clocks = await _transfer(
                run,
                sinks,
                _timeout(case, models),
                ticker,
                overhead,
                failures,
                serve,
                job_for,
                abort,
            )
            first_write = sinks.first_write_at()
            if failures:
                run.error = "; ".join(failures)
                return run
            session = sessions[0]
            report = session.report()
    loaded = [d.loaded_at for d in session.devices.values()]
    if not report.ok or session.started_at is None or any(t is None for t in loaded):
        run.error = "; ".join(report.errors) or "not every device was loaded"
        return run
    run.ok = True
    run.bytes = sum(d.bytes for d in report.devices)
    run.wire_bytes = int(sent.get("wire_bytes", 0))
    run.downtime = max(t for t in loaded if t is not None) - _first_sent(sent, session.started_at)
    run.throughput = run.bytes / run.downtime
    run.peak_queued_bytes = report.peak_queued_bytes
    # The core counts a loader as starved from the moment its gate opened (before the
    # sender even started): count only the part after the first packet.
    run.starved_seconds = max(d.starved_seconds for d in report.devices) - (
        session.started_at - t_serve
    )
    if first_write is not None:
        run.first_write_delay = first_write - _first_sent(sent, session.started_at)
    run.harness_seconds = overhead.seconds
    _set_cpu(run, sent, clocks, max(t for t in loaded if t is not None))
    run.sender_seconds = float(sent["t_end"]) - float(sent["t_start"])
    _set_bound(run, models, [d.bytes for d in report.devices], sent.get("channel_bytes", []), rates)
    return run


def _first_sent(sent: dict[str, Any], first_received: float) -> float:
    """When the first packet was sent, in trio time: the sender's first source read (it
    is in another process; both clocks are CLOCK_MONOTONIC), or the first header read
    here if that is earlier (it cannot be, unless the sender did not say)."""
    t_first = sent.get("t_first")
    if t_first is None:
        return first_received
    offset = trio.current_time() - time.monotonic()
    return min(float(t_first) + offset, first_received)


def _set_bound(
    run: Run,
    models: Models,
    device_bytes: list[int],
    chan_bytes: list[int],
    rates: list[float | None],
) -> None:
    bound = lower_bound(
        device_bytes,
        device_bandwidth=models.device_bandwidth if run.case.sink == "device" else None,
        config_seconds=models.config_seconds,
        wire_bytes=run.wire_bytes,
        link_rate=models.link_rate,
        channel_bytes=chan_bytes,
        channel_rates=rates,
    )
    run.bound = bound.seconds
    run.bound_limit = bound.limit
    # Without a device or link limit the "bound" is only the config time: efficiency
    # against it says nothing, so it is left out (the C reference ratio covers that case).
    if bound.limit in ("link", "device"):
        run.efficiency = bound.seconds / run.downtime


async def run_sequential(case: Case, models: Models, repeat: int, seed: int, ticker: Ticker) -> Run:
    """The vhost-user style baseline for ``case`` (its channel count and order unused)."""
    run = Run("seq", replace(case, channels=1, order="sequential"), repeat, seed)
    overhead = Overhead()
    rate = min((r for r in (models.channel_rate, models.link_rate) if r), default=None)
    with tempfile.TemporaryDirectory(prefix="vfiomig-bench-") as tmp:
        async with _case_sinks(case, models, overhead) as sinks:
            configs = [ConfigModel(models.config_seconds) for _ in range(case.devices)]
            reports: list[SeqReport] = []
            failures: list[str] = []

            async def serve(task_status: trio.TaskStatus[str]) -> None:
                try:
                    reports.append(
                        await serve_sequential(
                            _listen(case, tmp, "seq"), sinks.sinks, configs, task_status=task_status
                        )
                    )
                except (EOFError, OSError, trio.BrokenResourceError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

            def job_for(address: str) -> dict[str, Any]:
                return {
                    "mode": "seq",
                    "connect": [address],
                    "devices": _devices(case, seed),
                    "packet_size": case.packet_size,
                    "rate": rate,
                }

            def abort(address: str, nursery: trio.Nursery) -> None:
                nursery.cancel_scope.cancel()

            limit = _timeout(case, models) * case.devices
            sent, clocks = await _transfer(
                run, sinks, limit, ticker, overhead, failures, serve, job_for, abort
            )
            if failures or not reports:
                run.error = "; ".join(failures) or "the sequential receiver did not finish"
                return run
    rep = reports[0]
    run.ok = True
    run.bytes = rep.bytes
    run.wire_bytes = int(sent["wire_bytes"])
    run.downtime = rep.loaded_at[-1] - _first_sent(sent, rep.started_at)
    run.throughput = run.bytes / run.downtime
    run.harness_seconds = overhead.seconds
    _set_cpu(run, sent, clocks, rep.loaded_at[-1])
    run.sender_seconds = float(sent["t_end"]) - float(sent["t_start"])
    _set_bound(run, models, [case.size] * case.devices, [run.wire_bytes], [rate])
    return run


def seeds(seed: int, repeats: int) -> Iterator[tuple[int, int]]:
    """(repeat, seed) of each repeat: a fixed function of the bench seed."""
    for r in range(repeats):
        yield r, seed * 1000 + r


__all__ = [
    "ORDERS",
    "TRANSPORTS",
    "Case",
    "Models",
    "Run",
    "expand",
    "run_sequential",
    "run_vfiomig",
    "seeds",
]
