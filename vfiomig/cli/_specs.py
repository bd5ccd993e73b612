"""Sink, config-target and source specs from the command line (SPEC.md §4, §5).

``SCHEME:ARG`` strings map to factories. Schemes whose code lives in optional modules are
imported lazily, so ``vfiomig receive --device X=null:`` never imports the vfio-user code.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from vfiomig._core._errors import UsageError
from vfiomig._core._wire import device_name
from vfiomig.sinks import Sink
from vfiomig.sources import Source

#: scheme -> "module:function"; the function takes the text after ``scheme:``.
SINK_SCHEMES: dict[str, str] = {
    "file": "vfiomig.sinks._fd:open_file_sink",
    "null": "vfiomig.sinks._fd:open_null_sink",
    "fd": "vfiomig.sinks._fd:open_fd_sink",
    "vfio": "vfiomig.vfio._sink:open_vfio_sink",
    "attach": "vfiomig.control._attach:open_attach_sink",
    "vfio-user": "vfiomig.vfio_user.client._sink:open_vfio_user_sink",
}

SOURCE_SCHEMES: dict[str, str] = {
    "file": "vfiomig.sources._simple:open_file_source",
    "fd": "vfiomig.sources._simple:open_fd_source",
    "synth": "vfiomig.sources._simple:open_synth_source",
    "vfio-user": "vfiomig.vfio_user.client._source:open_vfio_user_source",
    "vfio": "vfiomig.vfio._source:open_vfio_source",
}


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One ``--device IDSTR[/INSTANCE]=SPEC`` argument, split."""

    idstr: str
    instance: int
    spec: str

    @property
    def name(self) -> str:
        return device_name(self.idstr, self.instance)


_INSTANCE = re.compile(r"[0-9]+")


def check_unique_devices(specs: list[DeviceSpec]) -> None:
    """Refuse a device named twice (before anything is opened).

    Raises:
        UsageError: naming the device and both specs.
    """
    seen: dict[tuple[str, int], DeviceSpec] = {}
    for spec in specs:
        first = seen.setdefault((spec.idstr, spec.instance), spec)
        if first is not spec:
            raise UsageError(
                f"--device {spec.name} is given twice ({first.spec} and {spec.spec}):"
                " each device once"
            )


def parse_device(text: str) -> DeviceSpec:
    """Split ``IDSTR[/INSTANCE]=SPEC``: the text up to the first ``=`` names the device,
    and its part after the last ``/`` is the instance when it is a decimal number."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise UsageError(f"device {text!r} must look like IDSTR[/INSTANCE]=SPEC")
    idstr, instance = name, 0
    head, slash, tail = name.rpartition("/")
    if slash and head and _INSTANCE.fullmatch(tail):
        idstr, instance = head, int(tail)
    if len(idstr.encode()) > 255:
        raise UsageError(f"device {idstr!r} has an idstr longer than 255 bytes")
    if instance > 0xFFFFFFFF:
        raise UsageError(f"device {name!r} has instance {instance} (max {0xFFFFFFFF})")
    return DeviceSpec(idstr, instance, spec)


def _resolve(table: dict[str, str], what: str, spec: str) -> tuple[Callable[[str], object], str]:
    scheme, sep, arg = spec.partition(":")
    if not sep or scheme not in table:
        known = ", ".join(f"{s}:" for s in table)
        raise UsageError(f"{what} {spec!r} has an unknown scheme (known: {known})")
    module, _, func = table[scheme].partition(":")
    try:
        factory = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:  # pragma: no cover - packaging error
        raise UsageError(f"{what} scheme {scheme!r} is not available: {exc}") from exc
    return factory, arg


def open_sink(spec: str) -> Sink:
    """Build the sink named by ``spec`` (``file:PATH``, ``null:``, ``fd:N``, ...)."""
    factory, arg = _resolve(SINK_SCHEMES, "sink", spec)
    sink = factory(arg)
    assert isinstance(sink, Sink)
    return sink


def open_source(spec: str) -> Source:
    """Build the source named by ``spec`` (``file:PATH``, ``fd:N``, ``synth:SIZE[:SEED]``, ...)."""
    factory, arg = _resolve(SOURCE_SCHEMES, "source", spec)
    source = factory(arg)
    assert isinstance(source, Source)
    return source
