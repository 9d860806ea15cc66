"""Opening an accepted DICOM connection in its own thread: TLS handshake, then the guard.

:class:`integration.transport.BoundedAssociationServer`'s accept loop only accepts; the
connection's thread calls :func:`open_guarded`, which runs the TLS handshake (when the
server has an SSL context: DICOM TLS, PS3.15 B.1) under one overall deadline,
``tls_handshake_timeout``, so that a silent socket cannot delay other callers' handshakes,
and then makes the socket keep the :class:`~integration.transport_limits.TransportLimits`
(:class:`~integration.guarded_socket.GuardedSocket`, PS3.8). :func:`guard_tls` makes an
:class:`ssl.SSLContext` wrap sockets into guarded TLS sockets, through the public
:attr:`ssl.SSLContext.sslsocket_class` hook.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from integration.guarded_socket import GuardedSocket
from integration.peers import PEER_WARNINGS, peer_label, source_address
from integration.transport_limits import TransportLimits

__all__ = ["GuardedSSLSocket", "guard_tls", "open_guarded"]


class GuardedSSLSocket(GuardedSocket, ssl.SSLSocket):  # type: ignore[misc]
    """:class:`GuardedSocket` over TLS (set as the server context's ``sslsocket_class``).

    ``recv(bufsize, flags)`` and ``send(data, flags)`` override :class:`ssl.SSLSocket`'s
    (``recv(buflen=1024, flags=0)``); pynetdicom passes the size positionally.
    """


def guard_tls(context: ssl.SSLContext) -> None:
    """Make ``context.wrap_socket`` return :class:`GuardedSocket` TLS sockets.

    A custom ``sslsocket_class`` keeps its behaviour (a guarded subclass of it is made);
    a context already guarded is left as it is.
    """
    current = context.sslsocket_class
    if issubclass(current, GuardedSocket):
        return
    if current is ssl.SSLSocket:
        context.sslsocket_class = GuardedSSLSocket
    else:  # keep a custom SSLSocket subclass's behaviour
        context.sslsocket_class = type(f"Guarded{current.__name__}", (GuardedSocket, current), {})


def open_guarded(
    request: socket.socket,
    client_address: Any,
    limits: TransportLimits,
    ssl_context: ssl.SSLContext | None,
) -> GuardedSocket | None:
    """The accepted ``request`` as a guarded socket, after the TLS handshake if any.

    Parameters
    ----------
    request
        The accepted TCP socket (taken over: detached, or wrapped by the TLS context).
    client_address
        The peer's address as accepted (log lines name its address and port only).
    limits
        What the socket keeps; ``tls_handshake_timeout`` bounds the whole handshake.
    ssl_context
        The server's context (passed through :func:`guard_tls`), or ``None`` for plain TCP.

    Returns
    -------
    GuardedSocket or None
        ``None`` when the TLS handshake failed or timed out (logged, rate-limited, and the
        socket closed).

    Raises
    ------
    RuntimeError
        ``ssl_context`` no longer makes guarded sockets (its ``sslsocket_class`` changed).
    """
    peer = peer_label(client_address)
    if ssl_context is None:
        sock = GuardedSocket(fileno=request.detach())
    else:
        request.settimeout(limits.tls_handshake_timeout)  # overall, see ssl docs
        try:
            wrapped = ssl_context.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError, the handshake timeout, resets
            PEER_WARNINGS.warn(
                "tls",
                source_address(client_address),
                "TLS handshake with %s failed: %s",
                peer,
                exc,
            )
            request.close()
            return None
        if not isinstance(wrapped, GuardedSocket):
            wrapped.close()
            raise RuntimeError("the server's SSL context no longer makes guarded sockets")
        sock = wrapped
    sock.install(limits, peer, source_address(client_address))
    return sock
