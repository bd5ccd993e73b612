"""The command line: ``vfiomig receive | send | bench | demo``. The only place trio.run()
is called.

Results go to stdout; progress, logs and errors to stderr (``--log-format text|json``).
Exit status: 0 when every device was loaded (or, for ``send``, every packet was sent),
1 when the migration failed (one line on stderr per failed device), 2 for a usage error
(one line naming the option).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import sys
from collections.abc import Sequence

import trio

from vfiomig._core._errors import UsageError
from vfiomig._logs import configure_logging, event
from vfiomig._version import __version__
from vfiomig.cli import _bench, _receive, _send
from vfiomig.cli._options import Parser, add_logging_options, size, wants_json_logs

log = logging.getLogger("vfiomig")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vfiomig",
        description="Receive a VFIO device's migration state from QEMU's multifd channels,"
        " reorder it within a memory budget and load it into the destination device.",
        epilog="Results go to stdout; progress (on a terminal), logs and errors to stderr."
        " Exit status: 0 success (receive: every device loaded), 1 the migration failed,"
        " 2 usage error. Sizes take K/M/G/T suffixes (binary). Deploying it: docs/operators.md.",
    )
    parser.add_argument("--version", action="version", version=f"vfiomig {__version__}")
    add_logging_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _receive.add_parser(sub)
    _send.add_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="a verified migration of synthetic state on loopback",
        description="Move 2 devices of synthetic state over 4 TCP channels on loopback in"
        " shuffled order and verify the sha256 of what landed and the config blobs. The"
        " report goes to stdout, the progress bar (on a terminal) to stderr.",
    )
    demo.add_argument(
        "--size",
        type=size,
        default=384 * 2**20,
        metavar="SIZE",
        help="synthetic state per device, with K/M/G/T suffixes (binary); default 384M",
    )
    _bench.add_parser(sub)
    for choice in sub.choices.values():  # also after the subcommand: vfiomig receive -v
        add_logging_options(choice, top=False)
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
    words = sys.argv[1:] if argv is None else list(argv)
    if wants_json_logs(words):
        configure_logging(0, "json")  # so that a parsing error is a JSON line too
        Parser.json_errors = True
    args = parser.parse_args(words)
    configure_logging(args.verbose, args.log_format)
    keep_freed_memory()
    # The objects of start-up (modules, classes, the parser) live as long as the process:
    # out of the collector's sight, its full collections stop walking them again and again
    # while packet views come and go (benchmarks/README.md). Only the command does this.
    gc.freeze()
    try:
        if args.command == "receive":
            return _receive.run_receive(args)
        if args.command == "send":
            return _send.run_send(args)
        if args.command == "demo":
            from vfiomig.cli._demo import run_demo
            from vfiomig.cli._progress import wanted

            return run_demo(args.size, progress=wanted(args.verbose, args.log_format))
        if args.command == "bench":
            from vfiomig.bench import bench_main

            return trio.run(bench_main, args)
    except UsageError as exc:
        log.error("error: %s", exc, extra=event("usage_error", reason=str(exc)))
        return 2
    except KeyboardInterrupt:
        log.error("interrupted", extra=event("interrupted"))
        return 1
    parser.error(f"unknown command {args.command}")  # exits with status 2
