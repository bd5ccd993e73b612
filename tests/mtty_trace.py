"""One script of migration uAPI calls, run against Linux's mtty driver and the fake device.

`run_trace` drives a `Backend` (a device fd, the ioctl/read/write functions and the FSM
arcs the driver stepped) through fixed scenarios: saving in STOP_COPY, precopy then
STOP_COPY on the same data fd, a precopy abort, blocked arcs, resuming a good, a bad, a
short and an overlong stream, a reset in PRE_COPY. Each call is recorded with what came
back (errno name, byte count, a new data fd's access mode and flags, or -1), the state
after every SET, and the arcs the driver stepped (mtty logs each step with dev_dbg; the
fake keeps `FakeVfioDevice.steps`). Data bytes themselves are not recorded (mtty's are
its registers, the fake's pseudo-random): only their sizes.

The guest program (tests/mtty_guest.py) runs it on a mtty device; tests/vm/test_mtty.py
compares that live trace with `fake_trace`, and tests/unit/test_fake_vs_mtty.py compares
the trace recorded from the driver (tests/data/mtty-trace.json) with `fake_trace` in every
host run. Where the two differ, the fake is wrong (or the driver changed).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfiomig.testing import FakeVfioDevice, SavingModel
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import IoctlFn, MigState

RECORDED = Path(__file__).resolve().parent / "data" / "mtty-trace.json"

#: A 1-port mtty device's stream: its header (magic, versions, nr_ports, flags), then one
#: ``struct serial_port`` (registers, loopback FIFO, divisor...: 36 bytes on x86-64).
MTTY_HEADER, MTTY_PORT = 24, 36
MTTY_FLAGS = uapi.VFIO_MIGRATION_STOP_COPY | uapi.VFIO_MIGRATION_P2P | uapi.VFIO_MIGRATION_PRE_COPY

Step = dict[str, Any]


@dataclass
class Backend:
    """What `run_trace` needs of a device (kernel or fake)."""

    ioctl: IoctlFn
    read: Callable[[int, int], bytes]
    write: Callable[[int, bytes], int]
    #: A device fd on a RUNNING device, the caller's to close.
    open_device: Callable[[], int]
    #: The arcs the driver stepped since the last call, as ``"FROM->TO"``.
    arcs: Callable[[], list[str]]
    #: Called with the stream the save scenario read (the fake checks resumes against it).
    saved: Callable[[bytes], None] = lambda stream: None


def fake_mtty(**options: Any) -> FakeVfioDevice:
    """The fake device set up as a 1-port mtty: its flags, its stream's sizes, its checks."""
    size = MTTY_HEADER + MTTY_PORT
    saving = SavingModel(initial=MTTY_HEADER, stop_copy=MTTY_PORT, precopy_end="EOF")
    return FakeVfioDevice(
        flags=MTTY_FLAGS,
        saving=saving,
        header_size=MTTY_HEADER,
        stream_limit=size,
        **options,
    )


def fake_trace() -> list[Step]:
    """`run_trace` on `fake_mtty`."""
    with fake_mtty() as dev:
        seen = 0

        def arcs() -> list[str]:
            nonlocal seen
            new, seen = dev.steps[seen:], len(dev.steps)
            return [f"{a.name}->{b.name}" for a, b in new]

        def saved(stream: bytes) -> None:
            dev.expected = stream

        backend = Backend(dev.ioctl, dev.read, dev.write, dev.open, arcs, saved)
        return run_trace(backend)


def recorded_trace() -> list[Step]:
    steps: list[Step] = json.loads(RECORDED.read_text())
    return steps


def first_difference(a: list[Step], b: list[Step]) -> str | None:
    """None when equal; else the first step that differs, both sides, for a test message."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"step {i}: {x} != {y}"
    if len(a) != len(b):
        return f"lengths {len(a)} != {len(b)}"
    return None


class _Tracer:
    def __init__(self, backend: Backend) -> None:
        self.b = backend
        self.steps: list[Step] = []
        self.dev = -1

    def _record(self, op: str, call: Callable[[], Any], describe: Callable[[Any], Step]) -> Any:
        try:
            value = call()
        except OSError as exc:
            step: Step = {"op": op, "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
            value = None
        else:
            step = {"op": op, **describe(value)}
        arcs = self.b.arcs()
        if arcs:
            step["arcs"] = arcs
        self.steps.append(step)
        return value

    def set(self, state: int) -> int | None:
        """SET ``state``; the returned data fd (None if -1 or a failure)."""
        name = MigState(state).name if state in MigState._value2member_map_ else str(state)

        def call() -> int:
            return uapi.set_state(self.dev, state, ioctl=self.b.ioctl)

        fd = self._record(f"SET {name}", call, _describe_fd)
        self.steps[-1]["state"] = self.state()
        return fd if fd is not None and fd >= 0 else None

    def state(self) -> str:
        value = uapi.get_state(self.dev, ioctl=self.b.ioctl)
        return MigState(value).name if value in MigState._value2member_map_ else str(value)

    def get(self, what: str) -> None:
        if what == "MIGRATION":
            call = lambda: uapi.get_migration_flags(self.dev, ioctl=self.b.ioctl)  # noqa: E731
        else:
            call = lambda: uapi.get_stop_copy_size(self.dev, ioctl=self.b.ioctl)  # noqa: E731
        self._record(f"GET {what}", call, lambda v: {"value": v})

    def info(self, fd: int, label: str) -> None:
        call = lambda: uapi.get_precopy_info(fd, ioctl=self.b.ioctl)  # noqa: E731
        self._record(f"PRECOPY_INFO {label}", call, lambda v: {"value": list(v)})

    def read(self, fd: int, label: str) -> bytes:
        data = self._record(f"read {label}", lambda: self.b.read(fd, 4096), lambda v: {"n": len(v)})
        return data if isinstance(data, bytes) else b""

    def write(self, fd: int, label: str, data: bytes) -> None:
        call = lambda: self.b.write(fd, data)  # noqa: E731
        self._record(f"write {label} {len(data)}", call, lambda v: {"n": v})

    def reset(self) -> None:
        self._record("RESET", lambda: uapi.reset(self.dev, ioctl=self.b.ioctl), lambda v: {})
        self.steps[-1]["state"] = self.state()


def _describe_fd(fd: int) -> Step:
    if fd < 0:
        return {"fd": -1}
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    mode = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}[flags & os.O_ACCMODE]
    return {
        "fd": mode,
        "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "nonblock": bool(flags & os.O_NONBLOCK),
    }


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def run_trace(backend: Backend) -> list[Step]:
    """The scenarios (module docstring), each starting and ending in RUNNING."""
    t = _Tracer(backend)
    t.dev = backend.open_device()
    backend.arcs()  # from here on
    S = MigState
    try:
        # Saving in STOP_COPY: a new read-only data fd, the whole stream, then 0 for good.
        t.get("MIGRATION")
        t.get("MIG_DATA_SIZE")
        fd = t.set(S.STOP_COPY)
        assert fd is not None, t.steps[-1]
        stream = t.read(fd, "saving")
        t.read(fd, "saving")
        t.info(fd, "saving fd in STOP_COPY")
        t.info(t.dev, "device fd")
        t.write(fd, "saving fd", b"x")
        t.set(S.STOP)
        t.read(fd, "saving fd after STOP")
        _close(fd)
        t.set(S.RUNNING)
        backend.saved(stream)

        # Precopy: the initial bytes, the end of the round, then STOP_COPY on the same fd.
        fd = t.set(S.PRE_COPY)
        assert fd is not None, t.steps[-1]
        t.info(fd, "precopy fd")
        t.read(fd, "precopy")
        t.info(fd, "precopy fd")
        t.read(fd, "precopy at the end of the round")
        t.set(S.STOP_COPY)
        t.read(fd, "precopy fd in STOP_COPY")
        t.read(fd, "precopy fd in STOP_COPY")
        t.set(S.STOP)
        _close(fd)
        t.set(S.RUNNING)

        # A precopy abort: back to RUNNING, the data fd dead.
        fd = t.set(S.PRE_COPY)
        t.read(fd or -1, "precopy")
        t.set(S.RUNNING)
        t.read(fd or -1, "precopy fd after RUNNING")
        _close(fd)

        # Blocked arcs and states that cannot be asked for.
        fd = t.set(S.STOP_COPY)
        t.set(S.PRE_COPY)
        t.set(S.ERROR)
        t.set(8)
        t.set(S.STOP)
        _close(fd)
        t.set(S.RUNNING)

        # Resuming a good stream: a new write-only fd, loaded when RESUMING -> STOP.
        fd = t.set(S.RESUMING)
        t.read(fd or -1, "resuming fd")
        t.write(fd or -1, "resuming", stream)
        t.set(S.STOP)
        t.write(fd or -1, "resuming fd after STOP", stream)
        _close(fd)
        t.set(S.RUNNING)

        # A bad header: refused on the write that completes it; only a reset leaves.
        bad = bytes([stream[0] ^ 0xFF]) + stream[1:]
        fd = t.set(S.RESUMING)
        t.write(fd or -1, "resuming bad header", bad)
        t.steps.append({"op": "GET MIG_DEVICE_STATE", "value": t.state()})
        t.reset()
        t.write(fd or -1, "resuming fd after reset", stream)
        _close(fd)

        # A short stream: RESUMING -> STOP refuses it and the device stays in RESUMING.
        fd = t.set(S.RESUMING)
        t.write(fd or -1, "resuming short", stream[:50])
        t.set(S.STOP)
        t.set(S.RUNNING)
        t.reset()
        _close(fd)

        # An overlong stream: refused whole, nothing taken; the right one still loads.
        fd = t.set(S.RESUMING)
        t.write(fd or -1, "resuming overlong", stream + b"\0")
        t.write(fd or -1, "resuming", stream)
        t.set(S.STOP)
        _close(fd)
        t.set(S.RUNNING)

        # A reset in PRE_COPY: RUNNING, the data fd dead, PRECOPY_INFO refused.
        fd = t.set(S.PRE_COPY)
        t.reset()
        t.read(fd or -1, "precopy fd after reset")
        t.info(fd or -1, "precopy fd after reset")
        _close(fd)
    finally:
        os.close(t.dev)
    return t.steps
