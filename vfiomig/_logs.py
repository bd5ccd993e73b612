"""Log records for people and for machines: event names and the two stderr formats.

Every log line of the receive path is a trace point with an event name, QEMU's own where
QEMU has one (``hw/vfio/trace-events``: ``vfio_load_state_device_buffer_incoming``,
``..._start``, ``..._starved``, ``..._load_start``, ``..._load_end``, ``..._end``,
``vfio_load_device_config_state_start``/``_end``), so that a trace of vfiomig and one of
QEMU's load thread read alike. A call site passes ``extra=event(NAME, device, key=value)``;
`JsonFormatter` writes it as one object a line, `TextFormatter` as ``vfiomig: message``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

#: The event name of a record logged without one.
DEFAULT_EVENT = "log"
LOG_FORMATS = ("text", "json")


def event(name: str, device: str | None = None, **fields: Any) -> dict[str, Any]:
    """The ``extra`` of a log call: event ``name``, the ``device`` it concerns, ``fields``."""
    return {"event": name, "device": device, "fields": fields}


class TextFormatter(logging.Formatter):
    """``vfiomig: <message>``, the message as written at the call site."""

    def __init__(self) -> None:
        super().__init__("vfiomig: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, device, event, fields, message."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        obj: dict[str, Any] = {
            "time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "device": getattr(record, "device", None),
            "event": getattr(record, "event", DEFAULT_EVENT),
            "fields": getattr(record, "fields", {}),
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def configure_logging(
    verbosity: int, log_format: str = "text", stream: TextIO | None = None
) -> None:
    """Send the ``vfiomig`` logger's records to ``stream`` (stderr) in ``log_format``.

    ``verbosity`` 0 logs warnings and errors, 1 (``-v``) adds the per-device trace points
    (load start/end, config load, gates), 2 (``-vv``) the per-packet ones.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger("vfiomig")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(
        logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING
    )
