"""Addresses (``tcp:HOST:PORT``, ``unix:PATH``), listeners and connections.

Listeners bind to what they are told; a TCP address without a host binds to loopback.
A UNIX socket is created with mode 0600, and a stale socket file at its path is replaced
(any other kind of file there is an error, never overwritten). Its directory must not be
writable by others unless sticky (refused), and should be enterable only by the user
(a warning otherwise): see `check_socket_directory`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdsocket
import stat
from dataclasses import dataclass

import trio

from vfiomig._core._errors import UsageError

log = logging.getLogger("vfiomig")


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed ``tcp:HOST:PORT`` or ``unix:PATH``."""

    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``tcp:HOST:PORT`` (``[v6]`` hosts allowed; empty host = 127.0.0.1) or ``unix:PATH``."""
    kind, sep, rest = text.partition(":")
    if kind == "unix" and sep and rest:
        return Address("unix", path=rest)
    if kind == "tcp" and sep:
        host, colon, port = rest.rpartition(":")
        if colon and port.isdigit() and int(port) < 65536:
            host = host.strip("[]") or "127.0.0.1"
            return Address("tcp", host=host, port=int(port))
    raise UsageError(f"address {text!r} must be tcp:HOST:PORT or unix:PATH")


async def open_listener(addr: Address, *, backlog: int = 64) -> tuple[trio.SocketListener, Address]:
    """Bind and listen on ``addr``; return the listener and the address really bound."""
    if addr.kind == "unix":
        check_socket_directory(addr.path)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            _remove_stale_socket(addr.path)
            # Bind under a 0177 umask so the socket is never reachable by others, not even
            # between bind() and a chmod().
            old = os.umask(0o177)
            try:
                await sock.bind(addr.path)
            finally:
                os.umask(old)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {addr}: {exc.strerror}") from exc
        return trio.SocketListener(sock), addr
    family = stdsocket.AF_INET6 if ":" in addr.host else stdsocket.AF_INET
    sock = trio.socket.socket(family, stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        await sock.bind((addr.host, addr.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {addr}: {exc.strerror}") from exc
    host, port = sock.getsockname()[:2]
    return trio.SocketListener(sock), Address("tcp", host=host, port=port)


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
        )


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
