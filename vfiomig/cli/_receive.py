"""``vfiomig receive``: its options and the command (SPEC.md §5).

The summary (``--json``) goes to stdout; logs and the per-device failure lines to stderr.
Listeners come from ``--listen``/``--control`` (``fd:N`` included) and from systemd's
socket activation (LISTEN_FDS: sockets named ``data`` and ``control``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from vfiomig._core import VfioMigError
from vfiomig._core._errors import UsageError
from vfiomig._logs import event
from vfiomig.cli._lifecycle import (
    Notifier,
    ReadyFile,
    notify_progress,
    signal_task,
    status_line,
)
from vfiomig.cli._options import (
    ADDR_HELP,
    SIZE_UNITS,
    add_tls_options,
    address,
    channel_count,
    device,
    positive_int,
    seconds,
    size,
    uuid,
)
from vfiomig.cli._progress import draw_progress, receive_status, wanted
from vfiomig.cli._specs import DeviceSpec, check_unique_devices, open_sink
from vfiomig.receive import DeviceSetup, MigrationFailed, ReceiverConfig, Session, SessionReport
from vfiomig.sinks import ConfigDir
from vfiomig.transport import inherited_sockets, options_to_contexts

if TYPE_CHECKING:
    from vfiomig.control import ControlServer

log = logging.getLogger("vfiomig")

SINK_HELP = (
    "a device to load and where (repeat for more devices): IDSTR is QEMU's idstr"
    " (0000:00:04.0/vfio), INSTANCE its instance (default 0); SINK is file:PATH, null:, fd:N,"
    " vfio:PATH (a VFIO device cdev), vfio:/dev/vfio/GROUP,device=NAME (a VFIO device of"
    " a group, for kernels without iommufd), vfio:fd:N (a VFIO device fd), vfio-user:SOCKPATH"
    "[,max-write=SIZE] (default 32K), or attach:[SECONDS] (the fd arrives with the control"
    " channel's attach-fd, kind vfio-device or data; wait at most SECONDS, default 60;"
    " needs --control)"
)


def add_parser(sub: Any) -> None:
    rx = sub.add_parser(
        "receive",
        help="receive device state from multifd channels and load it into devices",
        description="Receive VFIO device state from QEMU's multifd channels, reorder it"
        " within a memory budget and load it into each device's sink, then its config."
        " Exit status: 0 every device loaded, 1 the migration failed, 2 usage error. "
        + ADDR_HELP
        + ". Under systemd socket activation (LISTEN_FDS), sockets named data are data"
        " listeners and one named control is the control channel.",
    )
    rx.add_argument(
        "--listen",
        action="append",
        default=[],
        type=address,
        metavar="ADDR",
        help="where QEMU's multifd channels connect (repeatable); required unless"
        " socket activation passes sockets named data",
    )
    rx.add_argument(
        "--channels",
        type=channel_count,
        required=True,
        metavar="N",
        help="multifd channels QEMU opens (its multifd-channels parameter, 1 to 255)",
    )
    rx.add_argument(
        "--uuid",
        type=uuid,
        required=True,
        help="the migration's uuid as QEMU sends it in each channel's handshake",
    )
    rx.add_argument(
        "--device",
        action="append",
        required=True,
        type=device,
        metavar="IDSTR[/INSTANCE]=SINK",
        help=SINK_HELP,
    )
    rx.add_argument(
        "--control",
        type=address,
        metavar="ADDR",
        help="serve the msgpack control channel (SPEC §3) there: gates, precopy, attach-fd,"
        " config and progress events; default: none (then --config-out is needed)",
    )
    add_tls_options(rx, receiver=True)
    rx.add_argument(
        "--gate",
        choices=("control", "open"),
        help="when multifd data may be written: after data-complete/switchover-start on the"
        " control channel (control), or at once (open); default: control with --control,"
        " open without",
    )
    rx.add_argument(
        "--config-out",
        metavar="DIR",
        help="write each device's config blob to DIR/<idstr, / as _>.<instance>.config;"
        " default: as a config event on --control",
    )
    rx.add_argument(
        "--max-queued",
        type=size,
        default=256 * 2**20,
        metavar="SIZE",
        help="bound on the payload bytes queued for all devices together; when full,"
        f" channel readers pause (backpressure); {SIZE_UNITS}; default 256M",
    )
    rx.add_argument(
        "--packet-cap",
        type=size,
        default=64 * 2**20,
        metavar="SIZE",
        help=f"largest packet payload accepted; {SIZE_UNITS}; default 64M",
    )
    rx.add_argument(
        "--stall-timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="fail the session when nothing moves for this long after the first packet; default 30",
    )
    rx.add_argument(
        "--first-channel-timeout",
        type=seconds,
        metavar="SECONDS",
        help="fail when no data channel came this long after the listeners opened (a line"
        " is logged at intervals meanwhile); default: wait for ever, as QEMU's -incoming",
    )
    rx.add_argument(
        "--sink-timeout",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="bound on one sink write batch (at most 16 MiB) and on the sink's finish; default 60",
    )
    rx.add_argument(
        "--handshake-timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="bound on a connection's channel handshake (and its TLS handshake); default 10",
    )
    rx.add_argument(
        "--max-pending",
        type=positive_int,
        metavar="N",
        help="data connections whose handshake has not finished, at most; at the limit the"
        " one silent the longest is closed (not within 0.25 s of its accept: new ones wait"
        " in the listen backlog); default 4 x --channels + 16",
    )
    rx.add_argument(
        "--endian",
        choices=("be", "host"),
        default="be",
        help="byte order of the multifd packet headers: be (QEMU's wire format) or host;"
        " default be",
    )
    rx.add_argument(
        "--ram-page-count",
        type=int,
        metavar="N",
        help="pages in a RAM multifd packet when the channels also carry RAM packets"
        " (skipped); default: none expected",
    )
    rx.add_argument(
        "--ready-file",
        metavar="PATH",
        help='once every listener is up, write {"data": [ADDR...], "control": ADDR or null}'
        " there with the real bound addresses (atomically); default: none",
    )
    rx.add_argument(
        "--json",
        action="store_true",
        help="print a JSON summary on stdout at the end (per device: bytes, packets, seconds,"
        " peak queued bytes, time starved); default: no summary",
    )


def _activated_addresses(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The data and control addresses: ``--listen``/``--control`` and systemd's sockets."""
    sockets = inherited_sockets()
    unknown = sorted(set(sockets) - {"data", "control"})
    if unknown:
        raise UsageError(
            f"socket activation: socket name {unknown[0]!r} is neither data nor control"
            " (FileDescriptorName= in the socket unit)"
        )
    listen = [*args.listen, *(f"fd:{fd}" for fd in sockets.get("data", []))]
    control: str | None = args.control
    controls = sockets.get("control", [])
    if len(controls) > 1:
        raise UsageError(f"socket activation: {len(controls)} sockets named control (one at most)")
    if controls and control is not None:
        raise UsageError(f"--control {control} and a socket named control: pass one")
    if controls:
        control = f"fd:{controls[0]}"
    if not listen:
        raise UsageError(
            "no data listener: pass --listen ADDR, or start under socket activation"
            " with sockets named data"
        )
    fds = [a for a in [*listen, control] if a is not None and a.startswith("fd:")]
    twice = sorted({a for a in fds if fds.count(a) > 1})
    if twice:
        raise UsageError(f"socket {twice[0]} is given twice (--listen, --control, LISTEN_FDS)")
    return listen, control


def run_receive(args: argparse.Namespace) -> int:
    specs: list[DeviceSpec] = args.device
    check_unique_devices(specs)
    listen, control_addr = _activated_addresses(args)
    if args.config_out is None and control_addr is None:
        raise UsageError("no config target: pass --config-out DIR or --control ADDR")
    if args.config_out is not None and not os.path.isdir(args.config_out):
        raise UsageError(f"--config-out {args.config_out} is not a directory")
    gate = args.gate or ("control" if control_addr else "open")
    if gate == "control" and control_addr is None:
        raise UsageError("--gate control needs --control ADDR")
    if control_addr is None and any(s.spec.startswith("attach:") for s in specs):
        raise UsageError("--device ...=attach: needs --control ADDR (the fd comes with attach-fd)")
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
        raise UsageError(f"--device: {exc}") from exc
    config = ReceiverConfig(
        uuid=args.uuid,
        channels=args.channels,
        devices=devices,
        listen=listen,
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
        first_channel_timeout=args.first_channel_timeout,
    )
    control = None
    if control_addr is not None:
        from vfiomig.control import ControlServer

        control = ControlServer(control_addr, tls=tls, handshake_timeout=args.handshake_timeout)
        if args.config_out is None:
            config.config_target = control.config_target
    progress = wanted(args.verbose, args.log_format)
    report = trio.run(_run_receiver, config, args.ready_file, control, progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=None), flush=True)
    if report.ok:
        return 0
    # One line per failed device; a session-wide error is folded into those lines.
    failed: list[tuple[str | None, str]] = [(d.name, d.error) for d in report.devices if d.error]
    for name, line in failed or [(None, e) for e in report.errors]:
        row = next((d for d in report.devices if d.name == name), None)
        fields: dict[str, object] = {"error": line}
        if row is not None:
            fields.update(bytes=row.bytes, packets=row.packets, loaded=row.loaded)
        log.error("%s", line, extra=event("migration_failed", name, **fields))
    return 1


def _close_sinks(devices: list[DeviceSetup]) -> None:
    async def close() -> None:
        for d in devices:
            await d.sink.aclose()

    trio.run(close)


async def _run_receiver(
    config: ReceiverConfig,
    ready_file: str | None,
    control: ControlServer | None = None,
    progress: bool = False,
) -> SessionReport:
    from vfiomig.receive import ExtraTask, serve_receiver

    extra: list[ExtraTask] = []
    if control is not None:
        extra.append(control.serve)
    extra.append(signal_task)
    reports: list[SessionReport] = []
    usage: list[UsageError] = []
    ready = ReadyFile(ready_file) if ready_file else None
    notifier = Notifier.from_environ()

    async def serve(
        task_status: trio.TaskStatus[Session | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started = _Started(task_status)
        try:
            reports.append(await serve_receiver(config, task_status=started, extra_tasks=extra))
        except MigrationFailed as exc:  # possibly before every listener was up
            reports.append(exc.report)
        except UsageError as exc:  # e.g. an address already in use: exit 2, no traceback
            usage.append(exc)
        if not started.done:
            task_status.started(None)

    try:
        async with trio.open_nursery() as nursery:
            session: Session | None = await nursery.start(serve)
            if session is not None:
                if ready is not None:
                    ready.write(session, control)
                notifier.send(READY="1", STATUS=status_line(session))
                if notifier.enabled:
                    nursery.start_soon(_notify_until_done, notifier, session)
                if progress:
                    nursery.start_soon(draw_progress, session.done, lambda: receive_status(session))
    finally:
        if ready is not None:
            ready.remove()
        if reports:
            outcome = "every device loaded" if reports[0].ok else "the migration failed"
            notifier.send(STOPPING="1", STATUS=outcome)
        notifier.close()
    if usage:
        raise usage[0]
    return reports[0]


class _Started:
    """The task status `serve_receiver` reports to, remembering whether it did: a session
    that fails before its listeners are all up (a sink that cannot start) must still
    release the caller's ``nursery.start``."""

    def __init__(self, status: trio.TaskStatus[Session | None]) -> None:
        self.status = status
        self.done = False

    def started(self, value: Session | None = None) -> None:
        self.done = True
        self.status.started(value)


async def _notify_until_done(notifier: Notifier, session: Session) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notify_progress, notifier, session)
        await session.done.wait()
        nursery.cancel_scope.cancel()
