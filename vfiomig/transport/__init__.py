"""Transport: addresses (``tcp:``, ``unix:``, ``fd:``), systemd socket activation, listeners,
connections, socket tuning, TLS, and admission (pending connections bounded, accept errors
waited out).

Owns every socket option, the parsing of fds received with SCM_RIGHTS, and the rules for
UNIX socket files (0600, refused directories).
May import: `vfiomig._core` (errors) and `vfiomig._logs`. Imported by every stage that opens a
socket.
"""

from vfiomig._public import claim
from vfiomig.transport._admission import (
    ACCEPT_CAPACITY_ERRNOS,
    Admission,
    AdmissionStatistics,
    MeteredStream,
    Pending,
    Throttle,
    default_max_pending,
    nonblocking_twin,
)
from vfiomig.transport._sockets import (
    Address,
    Listener,
    UnixListener,
    check_socket_directory,
    close_fds,
    connect,
    inherited_sockets,
    listener_kind,
    open_listener,
    parse_address,
    peer_label,
    received_fds,
    reset_on_close,
    tune_socket,
    unix_socket_listening,
)
from vfiomig.transport._tls import client_context, options_to_contexts, server_context

__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "Address",
    "Listener",
    "Admission",
    "AdmissionStatistics",
    "MeteredStream",
    "Pending",
    "Throttle",
    "UnixListener",
    "check_socket_directory",
    "close_fds",
    "client_context",
    "connect",
    "default_max_pending",
    "inherited_sockets",
    "listener_kind",
    "nonblocking_twin",
    "open_listener",
    "options_to_contexts",
    "parse_address",
    "peer_label",
    "received_fds",
    "reset_on_close",
    "server_context",
    "tune_socket",
    "unix_socket_listening",
]

claim(__name__, globals(), __all__)
