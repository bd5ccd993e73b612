"""Addresses (``tcp:HOST:PORT``, ``unix:PATH``, ``fd:N``), listeners and connections.

``fd:N`` is a listening socket the process inherited (from systemd, libvirt or a shell),
and `inherited_sockets` reads systemd's socket activation variables (LISTEN_FDS): the
receiver then listens where its supervisor bound, and reports the real addresses.

Listeners bind to what they are told; a TCP address without a host binds to loopback.
A UNIX socket is created with mode 0600. A socket file at its path where a live listener
answers is refused (another receiver serves there: taking its path would leave it
running and unreachable); a stale one is replaced; any other kind of file there is an
error, never overwritten. The listener removes its socket file when it is closed, if the
file is still the one it bound. Its directory must not be
writable by others unless sticky (refused), and should be enterable only by the user
(a warning otherwise): see `check_socket_directory`.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket as stdsocket
import stat
import struct
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TypeAlias

import trio

from vfiomig._core._errors import UsageError
from vfiomig._logs import event

log = logging.getLogger("vfiomig")


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed ``tcp:HOST:PORT``, ``unix:PATH`` or ``fd:N``."""

    kind: str  # "tcp", "unix" or "fd"
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``tcp:HOST:PORT`` (``[v6]`` hosts allowed; empty host = 127.0.0.1),
    ``unix:PATH`` or ``fd:N`` (an inherited listening socket)."""
    kind, sep, rest = text.partition(":")
    if kind in ("tcp", "unix") and rest.startswith("//"):
        # libvirt's and QEMU's URI style (tcp://host:port): say the form we take.
        raise UsageError(f"address {text!r} is a URI: write {kind}:{rest[2:]} (no //)")
    if kind == "unix" and sep and rest:
        return Address("unix", path=rest)
    if kind == "fd" and rest.isdigit():
        return Address("fd", fd=int(rest))
    if kind == "tcp" and sep:
        host, colon, port = rest.rpartition(":")
        if colon and port.isdigit() and int(port) < 65536:
            host = host.strip("[]") or "127.0.0.1"
            return Address("tcp", host=host, port=int(port))
    raise UsageError(f"address {text!r} must be tcp:HOST:PORT, unix:PATH or fd:N")


#: Connections the kernel holds for a listener until they are accepted (capped by
#: net.core.somaxconn). Admission accepts at most ``max_pending / EVICT_GRACE`` silent
#: strangers a second under a flood, so they queue here: with 64 the queue was full and
#: the kernel dropped a real peer's SYN, sent again only after 1 s, then 2, 4 s (under the
#: e2e flood the sender's four channels took 1 to 4 s to connect; with 1024, a few ms).
#: Queued connections cost kernel memory, not the process's fds.
LISTEN_BACKLOG = 1024


async def open_listener(
    addr: Address, *, backlog: int = LISTEN_BACKLOG
) -> tuple[Listener, Address]:
    """Bind and listen on ``addr``; return the listener and the address really bound.

    For ``fd:N`` the listener takes over the inherited socket (closed with it, no longer
    inherited by children) and the address returned is the one it is bound to.
    """
    if addr.kind == "fd":
        return _inherited_listener(addr.fd)
    if addr.kind == "unix":
        check_socket_directory(addr.path)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            if _listener_answers(addr.path):
                raise UsageError(
                    f"cannot listen on {addr}: a live listener answers there (another"
                    " receiver?); stop it or choose another path"
                )
            _remove_stale_socket(addr.path)
            # Bind under a 0177 umask so the socket is never reachable by others, not even
            # between bind() and a chmod().
            old = os.umask(0o177)
            try:
                await sock.bind(addr.path)
            finally:
                os.umask(old)
            sock.listen(backlog)
            st = os.stat(addr.path)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {addr}: {exc.strerror}") from exc
        except BaseException:
            sock.close()
            raise
        return UnixListener(sock, addr.path, (st.st_dev, st.st_ino)), addr
    family = stdsocket.AF_INET6 if ":" in addr.host else stdsocket.AF_INET
    sock = trio.socket.socket(family, stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        await sock.bind((addr.host, addr.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {addr}: {exc.strerror}") from exc
    return trio.SocketListener(sock), _bound_address(sock)


class UnixListener(trio.abc.Listener[trio.SocketStream]):
    """A `trio.SocketListener` on a socket file it created: closing it removes the file,
    unless another process has put its own file there since."""

    def __init__(self, sock: trio.socket.SocketType, path: str, ident: tuple[int, int]) -> None:
        self.listener = trio.SocketListener(sock)
        self.path = path
        self._ident = ident

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.listener.socket

    async def accept(self) -> trio.SocketStream:
        return await self.listener.accept()

    async def aclose(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass  # removed already
        await self.listener.aclose()


#: What `open_listener` returns: a socket listener, one that owns its socket file for UNIX.
Listener: TypeAlias = trio.SocketListener | UnixListener


def _listener_answers(path: str) -> bool:
    """Whether a listener accepts connections on the UNIX socket at ``path`` (a connect
    that does not wait: refused or absent means none; a full backlog still answers)."""
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (BlockingIOError, InterruptedError):
        return True  # listening, its backlog full
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _bound_address(sock: trio.socket.SocketType) -> Address:
    if sock.family == stdsocket.AF_UNIX:
        name = sock.getsockname()
        return Address(
            "unix", path=name.decode(errors="replace") if isinstance(name, bytes) else name
        )
    host, port = sock.getsockname()[:2]
    return Address("tcp", host=host, port=port)


def _adopt(fd: int) -> stdsocket.socket:
    """The stream socket on inherited ``fd``, not yet owned (`detach` gives it back)."""
    try:
        sock = stdsocket.socket(fileno=fd)
    except OSError as exc:
        raise UsageError(f"fd:{fd} is not a socket: {exc.strerror}") from exc
    if sock.family not in (stdsocket.AF_INET, stdsocket.AF_INET6, stdsocket.AF_UNIX) or (
        sock.type != stdsocket.SOCK_STREAM
    ):
        sock.detach()
        raise UsageError(f"fd:{fd} is not a TCP or UNIX stream socket")
    return sock


def _inherited_listener(fd: int) -> tuple[trio.SocketListener, Address]:
    sock = _adopt(fd)
    if not sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ACCEPTCONN):
        sock.detach()
        raise UsageError(f"fd:{fd} is a socket that is not listening (listen() it first)")
    sock.set_inheritable(False)
    sock.setblocking(False)
    tsock = trio.socket.from_stdlib_socket(sock)
    return trio.SocketListener(tsock), _bound_address(tsock)


def listener_kind(addr: Address) -> str:
    """``tcp`` or ``unix``: what ``addr`` listens on (for ``fd:N``, the inherited socket's
    family, looked at without taking the socket over)."""
    if addr.kind != "fd":
        return addr.kind
    sock = _adopt(addr.fd)
    family = sock.family
    sock.detach()
    return "unix" if family == stdsocket.AF_UNIX else "tcp"


#: systemd's socket activation (sd_listen_fds(3)): the first passed fd and its variables.
LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> dict[str, list[int]]:
    """The fds systemd passed to this process (LISTEN_FDS from fd 3 on), by name.

    Names come from LISTEN_FDNAMES (``FileDescriptorName=`` in the socket unit); without
    it every fd is named ``data``. Only a LISTEN_PID equal to our pid counts: the
    variables may have leaked from a parent. The three variables are removed in any case,
    so that a child process does not take the sockets for its own.

    Raises:
        UsageError: LISTEN_FDS is not a number, or the names do not match the fds.
    """
    env = os.environ if environ is None else environ
    values = {var: env.pop(var, None) for var in _LISTEN_VARS}
    pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if count is None or pid is None or not pid.isdigit() or int(pid) != os.getpid():
        return {}
    if not count.isdigit():
        raise UsageError(f"socket activation: LISTEN_FDS={count!r} is not a number")
    n = int(count)
    labels = names.split(":") if names else ["data"] * n
    if len(labels) != n:
        raise UsageError(
            f"socket activation: LISTEN_FDNAMES names {len(labels)} sockets (LISTEN_FDS={n})"
        )
    found: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        found.setdefault(label, []).append(LISTEN_FDS_START + i)
    return found


def check_socket_directory(path: str) -> None:
    """Refuse a UNIX socket directory that others could write (without the sticky bit):
    anyone could then replace our socket and impersonate us to our peers. Warn when
    others can merely enter it, or when it is not ours: the socket's 0600 mode still
    keeps them out, but a directory only the user can enter is the safe place.

    Raises:
        UsageError: the directory is missing or writable by others.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise UsageError(f"socket directory {directory} is unusable: {exc.strerror}") from exc
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UsageError(
            f"socket directory {directory} is writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):o}): use a directory only you can enter"
        )
    if st.st_uid != os.getuid() or st.st_mode & 0o011:
        log.warning(
            "socket directory %s can be entered by others (mode %o, owner uid %d): "
            "the socket is mode 0600, but a directory only you can enter is safer",
            directory,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            extra=event("socket_directory_open", directory=directory),
        )


def unix_socket_listening(path: str) -> bool:
    """A UNIX socket at ``path`` is listening (Linux's socket table, no connection made).

    For waiting on a server process that binds its path and then listens, as
    libvfio-user does: its socket file appears a moment before it listens, and a probe
    connection would count as a client (libvfio-user's samples serve exactly one).
    vfiomig's own vfio-user server links its path only once it listens (the table names
    the socket by the staging name it was bound to): there, the file's existence is the
    test.
    """
    with open("/proc/net/unix") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            # Flags (column 4) has __SO_ACCEPTCON (0x10000) on a listening socket.
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    os.unlink(path)


async def connect(addr: Address) -> trio.SocketStream:
    """Open a stream to ``addr``."""
    if addr.kind == "fd":
        raise UsageError(f"{addr} is a listening socket: connect to tcp:HOST:PORT or unix:PATH")
    if addr.kind == "unix":
        return await trio.open_unix_socket(addr.path)
    stream = await trio.open_tcp_stream(addr.host, addr.port)
    return stream


def tune_socket(stream: trio.abc.Stream, *, buffer_size: int | None = None) -> None:
    """No Nagle delay on a data channel; fixed kernel buffers if asked (best effort).

    Without ``buffer_size`` the kernel's autotuning stays on, which is what loopback and
    most links want.
    """
    sock = getattr(stream, "socket", None)
    if sock is None:
        return
    if buffer_size:
        for opt in (stdsocket.SO_RCVBUF, stdsocket.SO_SNDBUF):
            try:
                sock.setsockopt(stdsocket.SOL_SOCKET, opt, buffer_size)
            except OSError:
                pass
    if sock.family in (stdsocket.AF_INET, stdsocket.AF_INET6):
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)


def reset_on_close(stream: trio.abc.Stream | trio.socket.SocketType) -> None:
    """Make the next close of ``stream``'s socket a reset (SO_LINGER 0: RST, not FIN),
    whatever its buffers hold, so that the peer cannot take it for an orderly end. Best
    effort: a socket already gone is left as it is. A TLS stream's transport is found."""
    # Through a TLS stream and a MeteredStream (``.stream``) to the socket stream.
    while not isinstance(stream, trio.SocketStream | trio.socket.SocketType):
        inner = getattr(stream, "transport_stream", None) or getattr(stream, "stream", None)
        if inner is None:
            return
        stream = inner
    sock = stream.socket if isinstance(stream, trio.SocketStream) else stream
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def peer_label(stream: trio.SocketStream, what: str) -> str:
    """``<what> from HOST:PORT``, ``<what> on unix socket`` or ``<what> (peer unknown)``: how
    log lines and errors name a connection."""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return f"{what} (peer unknown)"
    if isinstance(peer, tuple):
        return f"{what} from {peer[0]}:{peer[1]}"
    return f"{what} on unix socket"


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of the SCM_RIGHTS messages in ``recvmsg``'s ``ancdata``: the caller's to
    close (a partial trailing int is ignored)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` (errors ignored: the fd is gone either way) and empty it."""
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    fds.clear()
