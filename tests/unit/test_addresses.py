"""Addresses and systemd's socket activation variables (no sockets opened here)."""

from __future__ import annotations

import os

import pytest

from vfiomig import UsageError
from vfiomig.transport import Address, inherited_sockets, parse_address


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("tcp:127.0.0.1:4444", Address("tcp", host="127.0.0.1", port=4444)),
        ("tcp::0", Address("tcp", host="127.0.0.1", port=0)),
        ("tcp:[::1]:5", Address("tcp", host="::1", port=5)),
        ("unix:/run/x.sock", Address("unix", path="/run/x.sock")),
        ("fd:3", Address("fd", fd=3)),
    ],
)
def test_parse_address(text: str, want: Address) -> None:
    assert parse_address(text) == want
    assert parse_address(str(want)) == want


@pytest.mark.parametrize("text", ["fd:", "fd:x", "fd:-1", "udp:1", "tcp:host", "unix:"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(UsageError, match="must be tcp:HOST:PORT, unix:PATH or fd:N"):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "right"),
    [("tcp://10.0.0.2:4444", "tcp:10.0.0.2:4444"), ("unix:///run/x.sock", "unix:/run/x.sock")],
)
def test_uri_style_addresses_name_the_right_form(text: str, right: str) -> None:
    with pytest.raises(UsageError, match=f"is a URI: write {right} "):
        parse_address(text)


def _env(**values: str) -> dict[str, str]:
    return {"PATH": "/bin", **values}


def test_listen_fds_by_name_and_the_variables_are_removed() -> None:
    env = _env(LISTEN_PID=str(os.getpid()), LISTEN_FDS="3", LISTEN_FDNAMES="data:control:data")
    assert inherited_sockets(env) == {"data": [3, 5], "control": [4]}
    assert env == {"PATH": "/bin"}


def test_listen_fds_without_names_are_data() -> None:
    env = _env(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
    assert inherited_sockets(env) == {"data": [3, 4]}


def test_listen_fds_of_another_pid_are_not_ours_but_still_removed() -> None:
    env = _env(LISTEN_PID=str(os.getpid() + 1), LISTEN_FDS="1", LISTEN_FDNAMES="data")
    assert inherited_sockets(env) == {}
    assert env == {"PATH": "/bin"}


def test_no_activation() -> None:
    assert inherited_sockets(_env()) == {}


@pytest.mark.parametrize(
    ("fds", "names", "message"),
    [
        ("x", None, "LISTEN_FDS='x' is not a number"),
        ("2", "data", "LISTEN_FDNAMES names 1 sockets"),
    ],
)
def test_bad_activation_variables(fds: str, names: str | None, message: str) -> None:
    env = _env(LISTEN_PID=str(os.getpid()), LISTEN_FDS=fds)
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    with pytest.raises(UsageError, match=message):
        inherited_sockets(env)
