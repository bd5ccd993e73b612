"""The command line: ``vfiomig receive | send | demo``. The only place trio.run() is called.

Exit status: 0 when every device was loaded (or, for ``send``, every packet was sent),
1 when the migration failed (one line on stderr per failed device), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from vfiomig._core import VfioMigError
from vfiomig._core._errors import UsageError
from vfiomig._core._wire import parse_uuid
from vfiomig._units import parse_size
from vfiomig.cli._specs import open_sink, open_source, parse_device
from vfiomig.receive import DeviceSetup, MigrationFailed, ReceiverConfig, Session, SessionReport
from vfiomig.sinks import ConfigDir
from vfiomig.transport import options_to_contexts, parse_address

if TYPE_CHECKING:
    from vfiomig.control import ControlServer

log = logging.getLogger("vfiomig")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"vfiomig: error: {message}\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _uuid(text: str) -> bytes:
    try:
        return parse_uuid(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


SINK_HELP = (
    "SINK is file:PATH, null:, fd:N, vfio:PATH, vfio:fd:N, vfio-user:SOCKPATH, or attach: "
    "(attach:SECONDS) for an fd the control channel's attach-fd hands over (kind vfio-device: "
    "a VFIO device fd; kind data: a data fd already in RESUMING); attach: needs --control"
)


def _add_tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    p.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA (PEM): the receiver requires peers' certificates signed by it; "
        "the sender verifies the receiver against it",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vfiomig", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log trace points")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    rx = sub.add_parser("receive", help="receive device state from multifd channels")
    rx.add_argument("--listen", action="append", required=True, metavar="ADDR")
    rx.add_argument("--channels", type=int, required=True, metavar="N")
    rx.add_argument("--uuid", type=_uuid, required=True)
    rx.add_argument(
        "--device", action="append", required=True, metavar="IDSTR[/INSTANCE]=SINK", help=SINK_HELP
    )
    rx.add_argument("--control", metavar="ADDR", help="msgpack control channel")
    _add_tls_options(rx)
    rx.add_argument("--gate", choices=("control", "open"), help="default: control with --control")
    rx.add_argument("--config-out", metavar="DIR")
    rx.add_argument("--max-queued", type=_size, default=256 * 1024 * 1024, metavar="BYTES")
    rx.add_argument("--packet-cap", type=_size, default=64 * 1024 * 1024, metavar="BYTES")
    rx.add_argument("--stall-timeout", type=float, default=30.0, metavar="S")
    rx.add_argument(
        "--sink-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="bound on one sink write batch and on the sink's finish (default 60)",
    )
    rx.add_argument("--handshake-timeout", type=float, default=10.0, metavar="S")
    rx.add_argument(
        "--max-pending",
        type=int,
        metavar="N",
        help="data connections whose handshake has not finished, at most; at the limit the "
        "one silent the longest is closed (default 4 x --channels + 16 connections)",
    )
    rx.add_argument("--endian", choices=("be", "host"), default="be")
    rx.add_argument("--ram-page-count", type=int, metavar="N")
    rx.add_argument("--ready-file", metavar="PATH")
    rx.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    tx = sub.add_parser("send", help="send device state over multifd channels")
    tx.add_argument("--connect", action="append", required=True, metavar="ADDR")
    tx.add_argument("--channels", type=int, required=True, metavar="N")
    tx.add_argument("--uuid", type=_uuid, required=True)
    tx.add_argument("--device", action="append", required=True, metavar="IDSTR[/INSTANCE]=SOURCE")
    tx.add_argument("--control", metavar="ADDR", help="drive the receiver's control channel")
    tx.add_argument(
        "--switchover",
        choices=("switchover-start", "data-complete"),
        default="switchover-start",
        help="with --control: how the receiver's gates are opened",
    )
    tx.add_argument(
        "--precopy",
        action="append",
        default=[],
        metavar="IDSTR[/INSTANCE]=FILE",
        help="with --control: send FILE as precopy data first",
    )
    tx.add_argument(
        "--precopy-threshold",
        type=_size,
        default=1 << 20,
        metavar="SIZE",
        help="with --control: switch over once a PRE_COPY device reports at most SIZE "
        "pending (default 1MiB)",
    )
    tx.add_argument(
        "--precopy-rounds",
        type=int,
        default=8,
        metavar="N",
        help="with --control: at most N precopy rounds per device (default 8; 0: no precopy)",
    )
    _add_tls_options(tx)
    tx.add_argument("--packet-size", type=_size, default=1024 * 1024, metavar="BYTES")
    tx.add_argument(
        "--order", choices=("roundrobin", "random", "shuffle", "idx0-last"), default="roundrobin"
    )
    tx.add_argument("--seed", type=int, default=0)
    tx.add_argument("--window", type=int, default=16, help="shuffle window in packets")
    tx.add_argument("--endian", choices=("be", "host"), default="be")
    tx.add_argument("--channel-rate", type=_size, metavar="BYTES_PER_S")
    tx.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="a verified migration of synthetic state on loopback")
    demo.add_argument("--size", type=_size, default=384 * 1024 * 1024, help=argparse.SUPPRESS)

    from vfiomig.bench import add_parser as add_bench_parser

    add_bench_parser(sub, _size)
    # -v also after the subcommand (vfiomig receive -v ...); SUPPRESS keeps a -v given
    # before the subcommand from being reset by the subparser's default.
    for choice in sub.choices.values():
        choice.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log trace points"
        )
    return parser


#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Let glibc keep freed packet buffers for the next packets instead of returning them.

    Every packet's data is a buffer of its own, freed once written. By default glibc
    serves large ones with mmap() and gives freed memory back to the kernel, so each new
    buffer starts as fresh pages the kernel must fault in and zero: at 1 MiB packets that
    was 140 000 page faults per 4 GiB received and a fifth of the receive time
    (benchmarks/README.md). Freed memory stays bounded: at most ``trim_threshold`` above
    what the process still uses. Only the command line calls this: it owns its process; a
    library must not change its host's allocator. Returns whether glibc took it.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def run() -> None:
    """The ``vfiomig`` command: `main`, then exit at once.

    By the time `main` returns every session has ended, every sink and socket is closed
    and the report is printed; what is left is the interpreter's teardown, about 40 ms
    here, and an orchestrator waiting on the sidecar's exit to resume the VM would wait
    for it too. So the command flushes its streams and exits without it.
    """
    try:
        status = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        status = exc.code if isinstance(exc.code, int) else 1 if exc.code else 0
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="vfiomig: %(message)s",
        stream=sys.stderr,
    )
    keep_freed_memory()
    # The objects of start-up (modules, classes, the parser) live as long as the process:
    # out of the collector's sight, its full collections stop walking them again and again
    # while packet views come and go (benchmarks/README.md). Only the command does this.
    gc.freeze()
    try:
        if args.command == "receive":
            return _receive(args)
        if args.command == "send":
            return _send(args)
        if args.command == "demo":
            from vfiomig.cli._demo import run_demo

            return run_demo(args.size)
        if args.command == "bench":
            from vfiomig.bench import bench_main

            return trio.run(bench_main, args)
    except UsageError as exc:
        print(f"vfiomig: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vfiomig: interrupted", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")  # exits with status 2


def _receive(args: argparse.Namespace) -> int:
    if args.channels < 1 or args.channels > 255:
        raise UsageError(f"--channels {args.channels} is out of range (1 to 255)")
    if args.max_pending is not None and args.max_pending < 1:
        raise UsageError(f"--max-pending {args.max_pending} is below 1")
    specs = [parse_device(d) for d in args.device]
    if args.config_out is None and args.control is None:
        raise UsageError("no config target: pass --config-out DIR or --control ADDR")
    if args.config_out is not None and not os.path.isdir(args.config_out):
        raise UsageError(f"--config-out {args.config_out} is not a directory")
    for address in [*args.listen, *([args.control] if args.control else [])]:
        parse_address(address)
    gate = args.gate or ("control" if args.control else "open")
    if gate == "control" and args.control is None:
        raise UsageError("--gate control needs --control ADDR")
    if args.control is None and any(s.spec.startswith("attach:") for s in specs):
        raise UsageError("sink attach: needs --control ADDR (the fd comes with attach-fd)")
    tls = options_to_contexts(args.tls_cert, args.tls_key, args.tls_ca, server=True)
    devices: list[DeviceSetup] = []
    try:
        for spec in specs:
            target = (
                ConfigDir(args.config_out, spec.idstr, spec.instance) if args.config_out else None
            )
            devices.append(DeviceSetup(spec.idstr, spec.instance, open_sink(spec.spec), target))
    except VfioMigError as exc:
        _close_sinks(devices)
        raise UsageError(str(exc)) from exc
    config = ReceiverConfig(
        uuid=args.uuid,
        channels=args.channels,
        devices=devices,
        listen=args.listen,
        gate=gate,
        max_queued=args.max_queued,
        packet_cap=args.packet_cap,
        stall_timeout=args.stall_timeout,
        sink_timeout=args.sink_timeout,
        handshake_timeout=args.handshake_timeout,
        endian=args.endian,
        ram_page_count=args.ram_page_count,
        tls=tls,
        max_pending=args.max_pending,
    )
    control = None
    if args.control is not None:
        from vfiomig.control import ControlServer

        control = ControlServer(args.control, tls=tls, handshake_timeout=args.handshake_timeout)
        if args.config_out is None:
            config.config_target = control.config_target
    report = trio.run(_run_receiver, config, args, control)
    if args.json:
        print(json.dumps(report.to_json(), indent=None))
    if report.ok:
        return 0
    # One line per failed device; a session-wide error is folded into those lines.
    lines = [d.error for d in report.devices if d.error] or list(report.errors)
    for line in lines:
        print(f"vfiomig: {line}", file=sys.stderr)
    return 1


def _close_sinks(devices: list[DeviceSetup]) -> None:
    async def close() -> None:
        for d in devices:
            await d.sink.aclose()

    trio.run(close)


async def _run_receiver(
    config: ReceiverConfig, args: argparse.Namespace, control: ControlServer | None = None
) -> SessionReport:
    from vfiomig.receive import ExtraTask, serve_receiver

    extra: list[ExtraTask] = []
    if control is not None:
        extra.append(control.serve)
    extra.append(_signal_task)
    reports: list[SessionReport] = []
    usage: list[UsageError] = []

    async def serve(task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            reports.append(await serve_receiver(config, task_status=task_status, extra_tasks=extra))
        except MigrationFailed as exc:
            reports.append(exc.report)
        except UsageError as exc:  # e.g. an address already in use: exit 2, no traceback
            usage.append(exc)
            task_status.started(None)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        session: Session | None = await nursery.start(serve)
        if args.ready_file and session is not None:
            _write_ready_file(args.ready_file, session)
    if usage:
        raise usage[0]
    return reports[0]


async def _signal_task(
    session: Session, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            session.abort(f"received {signal.Signals(signum).name}")


def _write_ready_file(path: str, session: Session) -> None:
    control = session.control_address
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"data": session.bound, "control": control}, f)
    os.replace(tmp, path)


def _send(args: argparse.Namespace) -> int:
    from vfiomig.send import PrecopyOptions, SendDevice, SendReport, send_migration

    devices: list[SendDevice] = []
    for text in args.device:
        spec = parse_device(text)
        devices.append(SendDevice(spec.idstr, spec.instance, open_source(spec.spec)))
    tls = options_to_contexts(args.tls_cert, args.tls_key, args.tls_ca, server=False)
    precopy: dict[tuple[str, int], bytes] = {}
    for text in args.precopy:
        spec = parse_device(text)
        try:
            with open(spec.spec, "rb") as f:
                precopy[spec.idstr, spec.instance] = f.read()
        except OSError as exc:
            raise UsageError(f"--precopy {spec.spec}: {exc.strerror}") from exc

    async def run() -> SendReport:
        return await send_migration(
            connect_to=args.connect,
            channels=args.channels,
            uuid=args.uuid,
            devices=devices,
            packet_size=args.packet_size,
            order=args.order,
            seed=args.seed,
            window=args.window,
            endian=args.endian,
            channel_rate=args.channel_rate,
            control=args.control,
            tls=tls,
            precopy=precopy,
            precopy_options=PrecopyOptions(args.precopy_threshold, max(0, args.precopy_rounds)),
            switchover=args.switchover,
        )

    try:
        report = trio.run(run)
    except (OSError, trio.BrokenResourceError) as exc:
        print(f"vfiomig: send failed: {exc}", file=sys.stderr)
        return 1
    except VfioMigError as exc:
        if isinstance(exc, UsageError):
            raise
        print(f"vfiomig: send failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    **{k: getattr(report, k) for k in ("bytes", "packets", "seconds")},
                    "receiver": [
                        {k: v for k, v in e.items() if k != "data"} for e in report.control_events
                    ],
                    "precopy": {
                        name: {
                            "rounds": p.rounds,
                            "bytes": p.bytes,
                            "pending": list(p.pending),
                            "stopped": p.stopped,
                        }
                        for name, p in report.precopy.items()
                    },
                }
            )
        )
    return 0
