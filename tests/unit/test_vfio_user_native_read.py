"""The C vfio-user reader's failures (native/vfiomig_sendvu.c) in the Python client's words
(`vfiomig.vfio_user.client._native_read`): the names follow the C enum, and each failure
becomes the error the Python pipeline raises for it (end to end against failing servers:
tests/integration/test_send_vfio_user_native.py)."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from vfiomig._core._errors import SinkError
from vfiomig.vfio_user._header import ProtocolError
from vfiomig.vfio_user.client._native_read import FAILURES, native_read_error
from vfiomig.vfio_user.client._pipeline import VfioUserCommandError

HEADER = Path(__file__).resolve().parents[2] / "native" / "vfiomig_sendjob.h"
WHERE = "vfio-user /s"


def test_the_failures_follow_the_c_enum() -> None:
    body = re.search(r"enum vfm_vu_failure \{(.*?)\};", HEADER.read_text(), re.S)
    assert body is not None
    names = re.findall(r"VFM_VU_(\w+)", re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S))
    assert tuple(n.lower().replace("_", "-") for n in names) == FAILURES


def detail(failure: str, err: int = 0, a: int = 0, b: int = 0, c: int = 0) -> tuple[object, ...]:
    return (FAILURES.index(failure), err, 3, a, b, c, False, 4096)


@pytest.mark.parametrize(
    ("failure", "args", "kind", "text", "code"),
    [
        ("reply", (5,), VfioUserCommandError,
         "MIG_DATA_READ (65536 bytes at stream offset 4096) failed with errno 5 "
         "(Input/output error)", errno.EIO),
        ("reply", (0,), VfioUserCommandError,
         "MIG_DATA_READ (65536 bytes at stream offset 4096) failed with no errno", None),
        ("timeout", (errno.ETIMEDOUT, 0), SinkError,
         "waiting for a reply took longer than 1.5 s (3 replies outstanding)", errno.ETIMEDOUT),
        ("timeout", (errno.ETIMEDOUT, 1), SinkError,
         "sending MIG_DATA_READ took longer than 1.5 s (3 replies outstanding)", errno.ETIMEDOUT),
        ("closed", (errno.ECONNRESET,), SinkError,
         "server closed the connection with 3 replies outstanding", errno.ECONNRESET),
        ("io", (errno.EPIPE, 1), SinkError,
         "sending MIG_DATA_READ failed ([Errno 32] Broken pipe)", errno.EPIPE),
        ("io", (errno.ECONNRESET, 0), SinkError,
         "receiving a reply failed ([Errno 104] Connection reset by peer)", errno.ECONNRESET),
        ("small", (0, 12), ProtocolError, "message size 12 is below the header size 16", None),
        ("unexpected", (0, 11, 7, 0), ProtocolError,
         "server sent DMA_READ msg_id 7 with flags 0x0 while MIG_DATA_READ replies were "
         "outstanding", None),
        ("stray", (0, 9), ProtocolError,
         "server sent a MIG_DATA_READ reply to msg_id 9, which is not outstanding", None),
        ("order", (0, 9, 8), ProtocolError,
         "server answered MIG_DATA_READ msg_id 9 before msg_id 8 (replies out of request "
         "order)", None),
        ("short", (0, 4), ProtocolError,
         "MIG_DATA_READ reply payload of 4 bytes is too short (min 8)", None),
        ("too-much", (0, 70000, 65536, 70000), ProtocolError,
         "mig data read returned 70000 bytes (asked 65536, carried 70000)", None),
        ("after-end", (0, 3), ProtocolError, "mig data read returned 3 bytes after the end", None),
    ],
)  # fmt: skip
def test_each_failure_is_the_python_pipelines_error(
    failure: str, args: tuple[int, ...], kind: type[Exception], text: str, code: int | None
) -> None:
    error = native_read_error(WHERE, 65536, 1.5, detail(failure, *args))
    assert type(error) is kind
    assert str(error) == f"{WHERE}: {text}"
    if isinstance(error, SinkError):
        assert error.errno == code


def test_no_failure_is_no_error() -> None:
    assert native_read_error(WHERE, 65536, 1.5, detail("ok")) is None
