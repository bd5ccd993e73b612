"""The fake kernel device against a trace recorded from Linux's mtty driver.

tests/data/mtty-trace.json is tests/mtty_trace.py's script as the driver answered it
(recorded in the VM of tests/vm/test_mtty.py, which also compares the live driver with
the fake). Here, without a VM: the fake set up as mtty must give the same trace, call for
call: errnos, data fds and their flags, states, the arcs stepped.
"""

from tests.mtty_trace import fake_trace, first_difference, recorded_trace


def test_the_fake_answers_as_the_recorded_driver_did() -> None:
    assert first_difference(fake_trace(), recorded_trace()) is None


def test_the_recording_covers_what_the_fake_had_wrong() -> None:
    """The driver's answers the fake did not give before it was held to them."""
    steps = {step["op"]: step for step in recorded_trace()}
    assert steps["read precopy at the end of the round"] == {
        "op": "read precopy at the end of the round",
        "n": 0,  # where the uAPI documents ENOMSG
    }
    assert steps["write resuming bad header 60"]["errno"] == "EFAULT"
    assert steps["write resuming overlong 61"]["errno"] == "ENOMEM"
    short = [s for s in recorded_trace() if s["op"] == "SET STOP" and "errno" in s]
    assert short == [
        {"op": "SET STOP", "errno": "EINVAL", "arcs": ["RESUMING->STOP"], "state": "RESUMING"}
    ]
