"""TLS for data and control channels (``--tls-cert``, ``--tls-key``, ``--tls-ca``).

Receiver: with a certificate and key, every data channel and every TCP control connection
is TLS; with a CA as well, a peer must present a certificate that CA signed, or it is
dropped during the TLS handshake, before a single byte reaches the framer. A UNIX control
socket stays plain: fds cannot travel inside TLS, and the socket's mode (0600, in a private
directory) already limits it to the user. Sender: with a CA, the receiver's certificate
is verified against it (and its name against the TCP host); with a certificate and key,
they are presented to the receiver.
"""

from __future__ import annotations

import ssl

from vfiomig._core._errors import UsageError


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A server context; with ``ca``, client certificates signed by it are required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"tls: cannot load certificate, key or ca: {exc}") from exc
    return ctx


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client context: verify the server against ``ca`` (else the system store)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    try:
        if cert is not None:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"tls: cannot load certificate or key: {exc}") from exc
    return ctx


def options_to_contexts(
    cert: str | None, key: str | None, ca: str | None, *, server: bool
) -> ssl.SSLContext | None:
    """The command line's three options as a context, or None when TLS is off."""
    if cert is None and key is None and ca is None:
        return None
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if server:
        if cert is None or key is None:
            raise UsageError("tls on the receiver needs --tls-cert and --tls-key")
        return server_context(cert, key, ca)
    return client_context(ca, cert, key)
