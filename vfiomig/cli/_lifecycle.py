"""What the receive process does around its session, for the supervisor that runs it.

- The ready file (``--ready-file``): written atomically once every listener is up (a
  temporary file renamed over the path), and removed when the process ends, on every
  path it controls, if it is still the file this process wrote: a stale ready file would
  look "ready" to an orchestrator.
- systemd's notification protocol (``Type=notify``, sd_notify(3)): ``READY=1`` once
  listening, ``STATUS=`` lines with the progress while the session runs, ``STOPPING=1``
  at the end; datagrams to ``$NOTIFY_SOCKET``, written here (no library needed for three
  fields). Without the variable nothing is sent.
- Signals: SIGTERM, SIGINT and SIGHUP abort the session (every device not yet loaded
  fails, sinks are aborted, the summary is printed), so that a supervisor's stop or a
  closed terminal never leaves a device half loaded without a word.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

import trio

from vfiomig._logs import event
from vfiomig.receive import Session

if TYPE_CHECKING:
    from vfiomig.control import ControlServer

log = logging.getLogger("vfiomig")

#: The signals that abort a receive session.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Seconds between two ``STATUS=`` notifications.
STATUS_INTERVAL = 1.0


class ReadyFile:
    """``--ready-file``: `write` it once listening, `remove` it when the process ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ident: tuple[int, int] | None = None

    def write(self, session: Session, control: ControlServer | None) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"data": session.bound, "control": control.bound if control else None}, f)
            st = os.stat(tmp)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._ident = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        """Remove the file if this process wrote it and nobody replaced it since."""
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
        self._ident = None


class Notifier:
    """sd_notify(3) without libsystemd: one datagram per notification to NOTIFY_SOCKET
    (a path, or ``@name`` in the abstract namespace). Best effort: a failed send is
    logged once at debug level and never fails the session."""

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = address
        if address is not None and address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET``, which is removed so that no child notifies for us."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None) or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> None:
        """``KEY=value`` lines: ``send(READY="1", STATUS="listening")``."""
        if self.address is None:
            return
        text = "".join(f"{key}={value}\n" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            log.debug(
                "sd_notify to %s failed: %s",
                self.address,
                exc,
                extra=event("notify_failed", reason=str(exc)),
            )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(session: Session) -> str:
    """The session's progress in a line (systemd's STATUS=, ``systemctl status``)."""
    devices = list(session.devices.values())
    loaded = sum(1 for d in devices if d.loaded_at is not None)
    written = sum(d.buf.statistics().written_bytes for d in devices)
    if not session.channels_accepted:
        return f"waiting for data channels on {', '.join(session.bound)}"
    return (
        f"receiving: {session.channels_open} of {session.config.channels} channels open,"
        f" {written} bytes written, {loaded} of {len(devices)} devices loaded"
    )


async def notify_progress(notifier: Notifier, session: Session) -> None:
    """``STATUS=`` every `STATUS_INTERVAL` seconds until cancelled."""
    while True:
        notifier.send(STATUS=status_line(session))
        await trio.sleep(STATUS_INTERVAL)


async def signal_task(
    session: Session, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """An extra task of the session: a stop signal aborts it (see the module docstring)."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            log.warning(
                "received %s: aborting the migration",
                name,
                extra=event("signal_received", signal=name),
            )
            session.abort(f"received {name}")
