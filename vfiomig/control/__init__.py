"""The control channel of SPEC.md §3 (msgpack maps, fds over SCM_RIGHTS).

- `_proto`: sans-IO decoder and encoder (message types, fd association, size limits);
- `_server`: the receiver's side, run as an extra task of a receive session;
- `_attach`: the ``attach:`` sink, whose fd arrives with ``attach-fd``;
- `_client`: the peer's side (`open_control_client`), used by `vfiomig.send`.
May import: `vfiomig._core`, `vfiomig.transport`, `vfiomig.sinks`, `vfiomig.vfio`,
`vfiomig.receive`.
"""

from vfiomig._public import claim
from vfiomig.control._attach import AttachSink
from vfiomig.control._client import ControlClient, open_control_client
from vfiomig.control._server import ControlServer, control_task

__all__ = ["AttachSink", "ControlClient", "ControlServer", "control_task", "open_control_client"]

claim(__name__, globals(), __all__)
