"""What every subcommand's options share: the parser, value types that name the option in
their errors, and the option groups more than one subcommand has (TLS, logging).

Help texts say each option's unit and default; sizes take the suffixes of
`vfiomig._units.parse_size` everywhere (``4096``, ``64K``, ``64MiB``, ``1G``: binary units).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import NoReturn

from vfiomig._core._errors import UsageError
from vfiomig._core._wire import parse_uuid
from vfiomig._logs import LOG_FORMATS, event
from vfiomig._units import parse_size
from vfiomig.cli._specs import DeviceSpec, parse_device
from vfiomig.transport import parse_address

SIZE_UNITS = "bytes, or with a K/M/G/T suffix (binary: 64M = 64MiB = 67108864)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``vfiomig receive: error: argument --x: why``
    and exit status 2 (the usage itself is one ``--help`` away). Under ``--log-format
    json`` (`json_errors`, set before parsing) the line is a JSON log record (event
    ``usage_error``), like every other error."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        text = f"{self.prog}: error: {message} (see {self.prog} --help)"
        if Parser.json_errors:
            logging.getLogger("vfiomig").error(
                "%s", text, extra=event("usage_error", reason=message, command=self.prog)
            )
            self.exit(2)
        self.exit(2, text + "\n")


def wants_json_logs(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for ``--log-format json`` (looked at before parsing, so
    that parsing errors come in that format too)."""
    for i, arg in enumerate(argv):
        if arg == "--log-format=json" or (
            arg == "--log-format" and i + 1 < len(argv) and argv[i + 1] == "json"
        ):
            return True
    return False


def size(text: str) -> int:
    """A size option's value in bytes (`parse_size` suffixes)."""
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def uuid(text: str) -> bytes:
    try:
        return parse_uuid(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def address(text: str) -> str:
    """An ``ADDR`` (``tcp:HOST:PORT``, ``unix:PATH``, ``fd:N``), checked, kept as text."""
    try:
        parse_address(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def device(text: str) -> DeviceSpec:
    try:
        return parse_device(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def channel_count(text: str) -> int:
    value = positive_int(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"{value} is out of range (1 to 255)")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} s is not a positive time")
    return value


ADDR_HELP = "ADDR is tcp:HOST:PORT (port 0 picks one; no HOST = 127.0.0.1), unix:PATH or fd:N"


def add_tls_options(p: argparse.ArgumentParser, *, receiver: bool) -> None:
    g = p.add_argument_group("TLS (every data channel and a TCP control channel)")
    g.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM); default: no TLS")
    g.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA certificates (PEM): peers must present a certificate signed by one"
        if receiver
        else "CA certificates (PEM) to verify the receiver against; default: the system's",
    )


def add_logging_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v`` and ``--log-format``, before or after the subcommand.

    After it, the defaults are SUPPRESSed so that a value given before the subcommand is
    not reset by the subparser's default.
    """
    default = (lambda value: value) if top else (lambda _value: argparse.SUPPRESS)
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log QEMU's VFIO trace points: -v per device (load start/end, config, gates),"
        " -vv also per packet (incoming, starved, load start/end); default: warnings only",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default("text"),
        help="stderr logs as 'vfiomig: message' lines (text, the default) or one JSON"
        " object a line with time, level, device, event, fields (json)",
    )
