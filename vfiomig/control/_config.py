"""Config blobs to the control channel: the ``config`` event of SPEC.md §3 and its hand-over.

When a device's config target is the control channel (no ``--config-out``), its finish
step waits until a control connection wrote the ``config`` event to its socket. The event
goes only to connections that sent a valid message (a stranger must not take a device's
config). If none is there, it is kept: a peer that (re)connects gets the reply to its first
message (``hello``) first, then every ``config`` event of the session so far (the server
calls `ConfigHandover.replay` after handling that message). The wait warns every
`CONFIG_WARN_INTERVAL` seconds and fails the device after the session's stall timeout,
naming the undelivered config: the stall watchdog counts a loader inside its config
target as busy, so this bound is the one that holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from vfiomig._core._errors import SinkError
from vfiomig._logs import event
from vfiomig.control import _proto as proto
from vfiomig.control._connection import Connection, Out
from vfiomig.receive import DeviceSetup
from vfiomig.sinks import ConfigTarget

log = logging.getLogger("vfiomig")

#: A config event no connection took yet is logged this often (seconds, at most).
CONFIG_WARN_INTERVAL = 5.0


class _ControlConfig(ConfigTarget):
    def __init__(self, handover: ConfigHandover, setup: DeviceSetup) -> None:
        self.handover = handover
        self.setup = setup
        self.description = "control channel config event"

    async def load_config(self, data: bytes) -> None:
        msg = {
            "type": "config",
            "device": self.setup.idstr,
            "instance": self.setup.instance,
            "data": data,
        }
        await self.handover.deliver(Out(proto.encode(msg), trio.Event()), self.setup.name)


class ConfigHandover:
    """The ``config`` events of one control server.

    Args:
        admitted: the connections that sent a valid message, now.
        timeout: the session's stall timeout, the bound on one event's hand-over.
    """

    def __init__(
        self, admitted: Callable[[], list[Connection]], timeout: Callable[[], float]
    ) -> None:
        self.admitted = admitted
        self.timeout = timeout
        self.sent: list[Out] = []  # config events so far, for connections admitted later

    def target(self, setup: DeviceSetup) -> ConfigTarget:
        """The config target sending ``setup``'s blob as a ``config`` event."""
        return _ControlConfig(self, setup)

    def replay(self, conn: Connection) -> None:
        """``conn`` was just admitted (and answered): queue every config event so far."""
        for out in self.sent:
            conn.queue(out)

    async def deliver(self, out: Out, name: str) -> None:
        """Queue config event ``out`` (of device ``name``) on every admitted connection
        and on those admitted later, and wait until one wrote it to its socket.

        Raises:
            SinkError: no connection took it within the stall timeout.
        """
        assert out.delivered is not None
        self.sent.append(out)
        for conn in self.admitted():
            conn.queue(out)
        timeout = self.timeout()
        start = trio.current_time()
        while True:
            waited = trio.current_time() - start
            with trio.move_on_after(min(CONFIG_WARN_INTERVAL, timeout / 3, timeout - waited)):
                await out.delivered.wait()
                return
            waited = trio.current_time() - start
            peers = len(self.admitted())
            if waited >= timeout:
                raise SinkError(
                    f"{name}: config event ({len(out.data)} bytes) undelivered: no control"
                    f" connection took it within {timeout:g} s ({peers} connected)",
                    device=name,
                )
            log.warning(
                "%s: config event (%d bytes) waits for a control connection: %.0f of %g s",
                name,
                len(out.data),
                waited,
                timeout,
                extra=event(
                    "control_config_waiting",
                    name,
                    bytes=len(out.data),
                    waited=round(waited, 3),
                    timeout=timeout,
                    peers=peers,
                ),
            )
