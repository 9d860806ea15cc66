"""DICOM TLS (PS3.15 Annex B.1, "TLS Secure Transport Connection Profile") for the node.

Two contexts, both TLS 1.2 or newer (BCP 195, as PS3.15 B.9 asks) with Python's default
cipher selection:

- :func:`server_context` for the storage SCP: presents ``tls_cert_file`` / ``tls_key_file``
  and, when ``tls_require_client_cert`` is on, requires a client certificate issued by
  ``tls_ca_file`` (mutual TLS: the PACS authenticates itself, not only its AE title).
- :func:`client_context` for the storage SCU (delivery, ``tls_destinations``): verifies the
  PACS certificate and host name against ``tls_ca_file`` and presents the node's own
  certificate when one is configured.

The node's SCP (:class:`integration.transport.BoundedAssociationServer`) runs each TLS
handshake in the connection's own thread, never in the accept loop, so a silent peer delays
nobody else. The server context still bounds every handshake it does with an overall timeout
(``tls_handshake_timeout``): a plain pynetdicom server, which wraps sockets in its accept
loop, stays usable with it too.

Unreadable or invalid files raise :class:`~node.settings.ConfigError` naming the setting.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from node.settings import ConfigError, Settings

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "build_client_context",
    "build_server_context",
    "client_context",
    "server_context",
]

DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class _ServerContext(ssl.SSLContext):
    """An SSL context whose server-side handshake cannot block longer than a timeout."""

    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, *args: Any, **kwargs: Any
    ) -> ssl.SSLSocket:
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except OSError:  # includes ssl.SSLError and the handshake timeout
            sock.close()
            raise
        wrapped.settimeout(previous)
        return wrapped


def _readable(path: Path, setting: str) -> Path:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    return path


def _load_chain(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    _readable(cert_file, "tls_cert_file")
    _readable(key_file, "tls_key_file")
    try:
        ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_cert_file/tls_key_file: {cert_file} and {key_file} are not a PEM certificate "
            f"and its private key: {exc.reason or exc}"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca_file: Path) -> None:
    _readable(ca_file, "tls_ca_file")
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_ca_file: {ca_file} holds no usable PEM CA certificate: {exc.reason or exc}"
        ) from None


def build_server_context(
    *,
    cert_file: Path,
    key_file: Path,
    ca_file: Path | None = None,
    require_client_cert: bool = True,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> ssl.SSLContext:
    """Build the SCP's TLS context (PS3.15 B.1; TLS 1.2+).

    Parameters
    ----------
    cert_file, key_file
        The node's PEM certificate (chain) and private key.
    ca_file
        PEM CA certificates that issue the PACS client certificates.
    require_client_cert
        Refuse a TLS connection without a client certificate issued by ``ca_file``.
    handshake_timeout
        Seconds a TLS handshake may take, in all (the socket timeout of the handshake, which
        :meth:`ssl.SSLSocket.do_handshake` applies to the whole handshake).

    Raises
    ------
    ConfigError
        A file is unreadable or invalid (naming ``tls_cert_file``, ``tls_key_file`` or
        ``tls_ca_file``), or client certificates are required but no CA file is set.
    """
    if not handshake_timeout > 0:
        raise ValueError(f"handshake_timeout must be > 0, got {handshake_timeout}")
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.handshake_timeout = handshake_timeout
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert_file, key_file)
    if require_client_cert:
        if ca_file is None:
            raise ConfigError(
                "tls_ca_file: tls_require_client_cert is on but no CA file is set to verify "
                "the client certificates"
            )
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ca_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    if ca_file is not None:
        _load_ca(ctx, ca_file)
    return ctx


def build_client_context(
    *,
    ca_file: Path,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """Build the SCU's TLS context (PS3.15 B.1; TLS 1.2+) that verifies the PACS.

    Parameters
    ----------
    ca_file
        PEM CA certificates that issue the PACS server certificates.
    cert_file, key_file
        The node's own certificate and key, presented when the PACS asks for one.
    check_hostname
        Match the PACS certificate against the destination host (name or IP address).

    Raises
    ------
    ConfigError
        A file is unreadable or invalid, naming its setting.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca_file)
    if (cert_file is None) != (key_file is None):
        raise ConfigError("tls_cert_file: the client certificate needs both cert and key files")
    if cert_file is not None and key_file is not None:
        _load_chain(ctx, cert_file, key_file)
    return ctx


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's TLS context from the settings, or ``None`` when ``tls_cert_file`` is unset."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return build_server_context(
        cert_file=settings.tls_cert_file,
        key_file=settings.tls_key_file,
        ca_file=settings.tls_ca_file,
        require_client_cert=settings.tls_require_client_cert,
        handshake_timeout=settings.tls_handshake_timeout,
    )


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCU's TLS context from the settings, or ``None`` unless ``tls_destinations``."""
    if not settings.tls_destinations:
        return None
    if settings.tls_ca_file is None:  # the settings refuse this already; keep mypy honest
        raise ConfigError("tls_ca_file: tls_destinations is on but no CA file is set")
    return build_client_context(
        ca_file=settings.tls_ca_file,
        cert_file=settings.tls_cert_file,
        key_file=settings.tls_key_file,
    )
