"""The ``vfio:`` sink and source against a real kernel driver: Linux's mtty sample.

One VM boot (tests/mtty_vm.py, fixture ``mtty_run``) runs tests/mtty_guest.py, which
records; the expectations are here. mtty is a virtual serial port whose migration
stream is a 24-byte header (PRE_COPY data) and its port's registers and FIFO (36 bytes,
STOP_COPY data); its devices are mdevs, opened through the group/container API (no
iommufd in this kernel), so every migration here also exercises
``vfio:/dev/vfio/GROUP,device=UUID``.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from tests.mtty_trace import fake_trace, first_difference, recorded_trace
from tests.mtty_vm import GuestRun

STREAM = 60  # a 1-port mtty: 24 bytes of header, 36 of port state


def part(run: GuestRun, name: str) -> Any:
    value = run.report[name]
    assert "crashed" not in value, value["crashed"]
    return value


def test_the_driver_walks_the_arcs_and_gives_the_fds_the_fake_does(mtty_run: GuestRun) -> None:
    """Every call of the uAPI script, its errno, data fd, state and the arcs mtty logged,
    equal to the fake's; and to the trace recorded in tests/data (compared with the fake
    in every host run), or that recording is stale."""
    live = part(mtty_run, "trace")
    assert first_difference(live, fake_trace()) is None
    assert first_difference(live, recorded_trace()) is None, (
        "the driver changed: record tests/data/mtty-trace.json again from the report's trace"
    )


def test_four_devices_between_processes_with_and_without_precopy(mtty_run: GuestRun) -> None:
    """Devices 0 and 1 were RUNNING: PRE_COPY gives their header (then a 0-byte read,
    where the uAPI documents ENOMSG), STOP_COPY the rest on the same data fd, and the
    receiver writes the header first. Devices 2 and 3 were stopped: all of their state in
    STOP_COPY. Device 3's source went as ``vfio:fd:N``, every other device by its group.
    The sender's C send path read each STOP_COPY data fd (mtty's has no poll operation)."""
    run = part(mtty_run, "migrations")["several"]
    assert (run["send"]["rc"], run["receive"]["rc"]) == (0, 0), run
    # Round robin, unpaced, over UNIX sockets, with the C core: the C send path, each
    # device's data fd read by a C thread (vfiomig.send._threads).
    assert mtty_run.report["c_send_path"] is True
    # Nothing on stderr but the sender's machine-readable progress (`--json`).
    progress = [json.loads(line) for line in run["send"]["stderr"].splitlines()]
    assert all(event["event"] == "send_progress" for event in progress), progress
    assert progress and progress[-1]["phase"] == "done", progress
    assert run["receive"]["stderr"] == ""
    # Each destination now holds its own source's registers and FIFO (it held zeros).
    for before, after, expected in zip(
        run["dst_regs_before"], run["dst_regs"], run["expected_regs"], strict=True
    ):
        assert (before["scr"], before["lcr"], before["fifo"]) == (0, 0, "")
        assert {k: after[k] for k in expected} == expected
        assert after["lsr"] & 0x01  # data ready: the FIFO came along
    assert run["states"] == [["STOP", "STOP"]] * 4  # sources stopped, destinations loaded
    sent = json.loads(run["send"]["stdout"])
    precopy = {"rounds": 1, "bytes": 24, "pending": [24, 0], "stopped": "converged"}
    assert sent["precopy"] == {"mtty0/vfio/0": precopy, "mtty1/vfio/0": precopy}
    assert sent["bytes"] == 2 * (STREAM - 24) + 2 * STREAM  # multifd bytes
    summary = json.loads(run["receive"]["stdout"])
    # bytes: everything written to the device, the precopy header included.
    assert [(d["loaded"], d["bytes"], d["precopy_bytes"]) for d in summary["devices"]] == [
        (True, STREAM, 24),
        (True, STREAM, 24),
        (True, STREAM, 0),
        (True, STREAM, 0),
    ]
    assert run["configs"] == [f"mtty{i}_vfio.0.config" for i in range(4)]


def test_a_receiver_whose_device_refuses_the_stream(mtty_run: GuestRun) -> None:
    """A 2-port mtty refuses a 1-port header (EFAULT on the write that completes it): the
    receiver resets its device and fails with one line; the sender, in PRE_COPY, puts
    its device back in RUNNING with its registers intact."""
    run = part(mtty_run, "migrations")["refused"]
    assert (run["send"]["rc"], run["receive"]["rc"]) == (1, 1), run
    lines = run["receive"]["stderr"].splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("vfiomig: mtty0/vfio/0: sink vfio:/dev/vfio/")
    assert (
        "data fd write failed at byte 0: [Errno 14] Bad address (the driver refused the"
        " stream: not its device's state?)"
    ) in lines[0]
    assert "device back in RUNNING from PRE_COPY" in run["send"]["stderr"]
    assert "[Errno 14] Bad address" in run["send"]["stderr"]  # the receiver's cause
    assert run["states"] == [["RUNNING", "RUNNING"]]
    assert run["src_regs"]["scr"] == 0x77


EXPECTED_FAILURES = {
    # name: (errno, text in the message, state after)
    "bad_stream": (
        errno.EFAULT,
        "data fd write failed at byte 0: [Errno 14] Bad address (the driver refused",
        "RUNNING",
    ),
    "short_stream": (
        errno.EINVAL,
        "leaving RESUMING failed: [Errno 22] Invalid argument (driver rejected the state;"
        " device was in RESUMING, reset)",
        "RUNNING",
    ),
    "overlong_stream": (
        errno.ENOMEM,
        "data fd write failed at byte 0: [Errno 12] Cannot allocate memory (the driver refused",
        "RUNNING",
    ),
    "sink_wrong_state": (None, "device is in RESUMING before the migration", "RESUMING"),
    "source_wrong_state": (None, "device is in STOP_COPY before the migration", "STOP_COPY"),
    "group_busy": (
        errno.EBUSY,
        "cannot open the group: [Errno 16] Device or resource busy",
        "RUNNING",
    ),
    "no_such_device": (errno.ENODEV, "(the group holds no device '", None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILURES))
def test_failure_paths_of_the_real_driver(mtty_run: GuestRun, name: str) -> None:
    """Each failure is one message naming the device, with the driver's errno, and the
    device is left as SPEC §4 says: a sink resets a device it moved into RESUMING; a
    device in another's session (RESUMING, STOP_COPY) is not touched."""
    result = part(mtty_run, "failures")[name]
    code, text, state = EXPECTED_FAILURES[name]
    error = result["error"]
    assert error is not None, result
    assert error["message"].startswith("vfio device /dev/vfio/"), error
    assert text in error["message"], error
    assert error["errno"] == code
    assert result.get("state_after") == state


def test_a_good_stream_loads_after_the_failures(mtty_run: GuestRun) -> None:
    failures = part(mtty_run, "failures")
    assert failures["stream_size"] == STREAM
    good = failures["good_stream_after_them"]
    assert good == {"error": None, "state_after": "STOP"}
    regs = failures["good_stream_regs"]
    assert (regs["scr"], regs["lcr"], regs["mcr"], regs["fifo"]) == (0x5A, 0x03, 0x01, b"ok".hex())


def test_an_abort_in_precopy_returns_the_device_to_running(mtty_run: GuestRun) -> None:
    abort = part(mtty_run, "failures")["abort_in_precopy"]
    assert (abort["entered"], abort["info"], abort["read"]) == (True, [24, 0], 24)
    assert abort["state_after"] == "RUNNING"
    assert abort["regs_after"]["scr"] == 0x5A  # the running device kept its state
