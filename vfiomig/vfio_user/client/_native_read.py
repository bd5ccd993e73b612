"""A vfio-user client's STOP_COPY stream read by the C send path (native/vfiomig_sendvu.c).

`vfiomig send` hands the client's socket to a reader thread of its `SendJob` for the
STOP_COPY data: the thread keeps ``window`` MIG_DATA_READs of `data_limit` bytes in flight
and receives each reply's data straight into the chunks the channels' threads send, as
`_read_pipeline.ReadPipeline` does in Python (the same 24-byte requests, the same checks;
replies must come in request order). The client is idle while the thread owns the
socket (nothing outstanding, nothing buffered: `VfioUserClient.native_read` says so), and the
thread hands it back with nothing outstanding: after an ERROR reply or a cancel it
collects the replies still owed (within one reply timeout) before it exits, so the
client can still SET RUNNING.

How the thread's reads ended comes back as `SendJob.source_detail`: ``(failure, errno,
pending, a, b, c, in_step, offset)``. `native_read_error` words a failure exactly as the Python
pipeline would have (the messages users see do not depend on the path), and
`native_read_ended` marks the client broken when the socket was left out of step.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Final, Literal, TypeAlias, get_args

from vfiomig._core._errors import SinkError
from vfiomig.vfio_user._header import ProtocolError, command_name
from vfiomig.vfio_user._migration_bodies import MIG_DATA_HEADER_SIZE, READ
from vfiomig.vfio_user.client._pipeline import VfioUserCommandError, describe_errno

#: Why the C reader failed: native/vfiomig_sendjob.h's enum vfm_vu_failure.
Failure: TypeAlias = Literal[
    "ok",
    "reply",
    "timeout",
    "closed",
    "io",
    "small",
    "unexpected",
    "stray",
    "order",
    "short",
    "too-much",
    "after-end",
]
#: The enum's values, in order.
FAILURES: Final[tuple[Failure, ...]] = get_args(Failure)


def _read_error(where: str, size: int, server_errno: int, offset: int) -> VfioUserCommandError:
    return VfioUserCommandError(
        f"{where}: MIG_DATA_READ ({size} bytes at stream offset {offset}) failed with "
        f"{describe_errno(server_errno)}",
        command=READ,
        errno=server_errno or None,
    )


def _protocol_text(failure: Failure, a: int, b: int, c: int) -> str:
    """The Python pipeline's words for a protocol violation (`_pipeline`, `_read_pipeline`)."""
    if failure == "small":
        return f"message size {a} is below the header size 16"
    if failure == "unexpected":
        return (
            f"server sent {command_name(a)} msg_id {b} with flags {c:#x} "
            f"while {command_name(READ)} replies were outstanding"
        )
    if failure == "stray":
        return f"server sent a {command_name(READ)} reply to msg_id {a}, which is not outstanding"
    if failure == "order":
        return (
            f"server answered {command_name(READ)} msg_id {a} before msg_id {b} "
            "(replies out of request order)"
        )
    if failure == "short":
        return f"MIG_DATA_READ reply payload of {a} bytes is too short (min {MIG_DATA_HEADER_SIZE})"
    if failure == "too-much":
        return f"mig data read returned {a} bytes (asked {b}, carried {c})"
    return f"mig data read returned {a} bytes after the end"  # after-end


def native_read_error(
    where: str, size: int, timeout: float, detail: tuple[object, ...]
) -> BaseException | None:
    """The error the Python pipeline would have raised for the C reader's failure
    ``detail`` (``where``: the client's name, ``size``: the bytes each read asked); None
    when the reader did not fail."""
    code, err, pending, a, b, c, _, offset = detail
    assert isinstance(code, int) and isinstance(err, int) and isinstance(pending, int)
    assert isinstance(offset, int)
    assert isinstance(a, int) and isinstance(b, int) and isinstance(c, int)
    failure = FAILURES[code]
    if failure == "ok":
        return None
    if failure == "reply":
        return _read_error(where, size, err, offset)
    if failure == "timeout":
        what = "sending MIG_DATA_READ" if a else "waiting for a reply"
        return SinkError(
            f"{where}: {what} took longer than {timeout:g} s ({pending} replies outstanding)",
            errno=_errno.ETIMEDOUT,
        )
    if failure == "closed":
        return SinkError(
            f"{where}: server closed the connection with {pending} replies outstanding",
            errno=_errno.ECONNRESET,
        )
    if failure == "io":
        cause = OSError(err, os.strerror(err))
        what = "sending MIG_DATA_READ" if a else "receiving a reply"
        return SinkError(f"{where}: {what} failed ({cause})", errno=err)
    return ProtocolError(f"{where}: {_protocol_text(failure, a, b, c)}")
