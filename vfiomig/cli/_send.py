"""``vfiomig send``: its options and the command (the sending side, for tests and benches).

The summary (``--json``) goes to stdout; logs and the failure line to stderr. SIGTERM,
SIGINT and SIGHUP abort the send (every device aborted, a VFIO device back to RUNNING;
the channels reset): one line, exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import trio

from vfiomig._core import VfioMigError
from vfiomig._core._errors import UsageError
from vfiomig._logs import event
from vfiomig.cli._options import (
    SIZE_UNITS,
    add_tls_options,
    address,
    channel_count,
    device,
    positive_int,
    size,
    uuid,
)
from vfiomig.cli._progress import SendProgress, draw_progress, emit_events, wanted
from vfiomig.cli._specs import DeviceSpec, check_unique_devices, open_source
from vfiomig.transport import options_to_contexts

log = logging.getLogger("vfiomig")

SOURCE_HELP = (
    "a device to send and where its state comes from (repeat for more devices): SOURCE is"
    " synth:SIZE[:SEED] (synthetic state; SEED default 0), file:PATH, fd:N,"
    " vfio:PATH, vfio:/dev/vfio/GROUP,device=NAME or vfio:fd:N (a kernel VFIO device: a"
    " cdev, a device of a group, an inherited fd; PRE_COPY when offered and --control,"
    " then STOP_COPY), or vfio-user:SOCKPATH[,config=FILE] (a vfio-user server's device)"
)


def _connect_address(text: str) -> str:
    value = address(text)
    if value.startswith("fd:"):
        raise argparse.ArgumentTypeError(f"{text} is a listening socket: connect to tcp: or unix:")
    return value


def add_parser(sub: Any) -> None:
    tx = sub.add_parser(
        "send",
        help="send device state over multifd channels (QEMU's source side, for tests)",
        description="Send device state as QEMU's multifd channels carry it. Exit status: 0"
        " the receiver took every byte (with --control: every device loaded; without: every"
        " channel read to its end and closed in order by the receiver), 1 the migration"
        " failed or the receiver refused it, 2 usage error. ADDR is tcp:HOST:PORT or"
        " unix:PATH.",
    )
    tx.add_argument(
        "--connect",
        action="append",
        required=True,
        type=_connect_address,
        metavar="ADDR",
        help="the receiver's data listener; channel i connects to the (i mod count)th one",
    )
    tx.add_argument(
        "--channels", type=channel_count, required=True, metavar="N", help="channels (1 to 255)"
    )
    tx.add_argument("--uuid", type=uuid, required=True, help="the migration's uuid")
    tx.add_argument(
        "--device",
        action="append",
        required=True,
        type=device,
        metavar="IDSTR[/INSTANCE]=SOURCE",
        help=SOURCE_HELP,
    )
    tx.add_argument(
        "--control",
        type=_connect_address,
        metavar="ADDR",
        help="drive the receiver's control channel (hello, precopy, switchover, wait for"
        " loaded/done); default: none",
    )
    tx.add_argument(
        "--switchover",
        choices=("switchover-start", "data-complete"),
        default="switchover-start",
        help="with --control: how the receiver's gates are opened; default switchover-start",
    )
    tx.add_argument(
        "--precopy",
        action="append",
        default=[],
        type=device,
        metavar="IDSTR[/INSTANCE]=FILE",
        help="with --control: send FILE as the device's precopy data first (repeatable);"
        " default: none",
    )
    tx.add_argument(
        "--precopy-threshold",
        type=size,
        default=2**20,
        metavar="SIZE",
        help="with --control: switch over once a PRE_COPY device reports at most SIZE"
        f" pending; {SIZE_UNITS}; default 1M",
    )
    tx.add_argument(
        "--precopy-rounds",
        type=int,
        default=8,
        metavar="N",
        help="with --control: at most N precopy rounds per device (0: no precopy); default 8",
    )
    add_tls_options(tx, receiver=False)
    tx.add_argument(
        "--packet-size",
        type=size,
        default=2**20,
        metavar="SIZE",
        help=f"payload bytes per packet; {SIZE_UNITS}; default 1M",
    )
    tx.add_argument(
        "--order",
        choices=("roundrobin", "random", "shuffle", "idx0-last"),
        default="roundrobin",
        help="which channel carries which packet: QEMU's round robin, random, shuffled within"
        " --window, or idx 0 last; default roundrobin",
    )
    tx.add_argument(
        "--seed", type=int, default=0, help="seed of the random and shuffle orders; default 0"
    )
    tx.add_argument(
        "--window",
        type=positive_int,
        default=16,
        metavar="PACKETS",
        help="shuffle window of --order shuffle, in packets; default 16",
    )
    tx.add_argument(
        "--endian",
        choices=("be", "host"),
        default="be",
        help="byte order of the packet headers; default be (QEMU's)",
    )
    tx.add_argument(
        "--channel-rate",
        type=size,
        metavar="SIZE_PER_S",
        help=f"pace each channel to SIZE bytes per second; {SIZE_UNITS}; default: unpaced",
    )
    tx.add_argument(
        "--json",
        action="store_true",
        help="print a JSON summary on stdout (bytes, packets, seconds, cpu_seconds, the"
        " receiver's events) and, when stderr is not a terminal, a send_progress event a"
        " second on stderr (one JSON object a line); default: neither",
    )


def _wire_total(devices: list[Any], packet_size: int) -> int | None:
    """The multifd bytes the send will put on the wire, headers included, when every
    source knows its length (the config packets, a few hundred bytes, left out)."""
    from vfiomig._core import PACKET_HEADER_SIZE

    total = 0
    for dev in devices:
        size = dev.source.size_hint()
        if size is None:
            return None
        total += size + PACKET_HEADER_SIZE * -(-size // packet_size)
    return total


#: The signals that abort a send (as a receive session, `vfiomig.cli._lifecycle`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _watch(signals: AsyncIterator[int], scope: trio.CancelScope, stopped: list[str]) -> None:
    async for signum in signals:
        stopped.append(signal.Signals(signum).name)
        scope.cancel()
        return


def run_send(args: argparse.Namespace) -> int:
    from vfiomig.send import PrecopyOptions, SendDevice, SendReport, SendStatus, send_migration

    specs: list[DeviceSpec] = args.device
    check_unique_devices(specs)
    devices = [SendDevice(s.idstr, s.instance, open_source(s.spec)) for s in specs]
    tls = options_to_contexts(args.tls_cert, args.tls_key, args.tls_ca, server=False)
    precopy: dict[tuple[str, int], bytes] = {}
    for spec in args.precopy:
        try:
            with open(spec.spec, "rb") as f:
                precopy[spec.idstr, spec.instance] = f.read()
        except OSError as exc:
            raise UsageError(f"--precopy {spec.spec}: {exc.strerror}") from exc

    progress = wanted(args.verbose, args.log_format)
    statuses: list[SendStatus] = []
    # On a terminal a progress line; otherwise, with --json, progress events on stderr.
    events = args.json and not progress

    async def run() -> SendReport:
        status = SendStatus()
        statuses.append(status)
        if not progress and not events:
            return await _stoppable(status)
        view = SendProgress(status, _wire_total(devices, args.packet_size))
        # The send runs beside the line, outside the nursery's error group: its errors
        # reach the handlers below as themselves.
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            if progress:
                nursery.start_soon(draw_progress, status.done, view.line)
            else:
                nursery.start_soon(emit_events, status.done, view.event)
            try:
                report = await _stoppable(status)
            except Exception as exc:
                failure = exc
        if failure is not None:
            raise failure
        return report

    async def _stoppable(status: SendStatus) -> SendReport:
        """The send, which SIGTERM, SIGINT or SIGHUP cancel: every device is aborted (a
        VFIO device back to RUNNING), the channels reset, then one line and exit 1."""
        from vfiomig.send import SendError

        stopped: list[str] = []
        failure: Exception | None = None
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, signals, nursery.cancel_scope, stopped)
                try:
                    report = await _send(status)
                except Exception as exc:  # outside the nursery's error group
                    failure = exc
                nursery.cancel_scope.cancel()
        if stopped:
            raise SendError(f"migration aborted: received {stopped[0]}")
        if failure is not None:
            raise failure
        return report

    async def _send(status: SendStatus) -> SendReport:
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
            status=status,
        )

    try:
        report = trio.run(run)
    except (OSError, trio.BrokenResourceError, VfioMigError) as exc:
        if isinstance(exc, UsageError):
            raise
        from vfiomig.send._close import describe

        message = str(exc) if isinstance(exc, VfioMigError) else describe(exc)
        log.error("send failed: %s", message, extra=event("send_failed", reason=message))
        if args.json:
            status = statuses[0] if statuses else None
            summary = {
                "ok": False,
                "error": message,
                "phase": status.phase if status else "connecting",
                "sent_bytes": status.sent_bytes if status else 0,
                "precopy_bytes": status.precopy_bytes if status else 0,
            }
            print(json.dumps(summary), flush=True)
        return 1
    if args.json:
        summary = {
            "ok": True,
            **{k: getattr(report, k) for k in ("bytes", "packets", "seconds", "cpu_seconds")},
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
        print(json.dumps(summary), flush=True)
    return 0
