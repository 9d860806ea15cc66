"""The HTTP server component of ``cxr-node serve``: uvicorn in a thread.

:func:`make_api_server` builds an :class:`ApiServer` on ``settings.api_host`` /
``settings.api_port`` (loopback by default; ``CXR_NODE_API_HOST`` to change). ``start()``
returns once the socket listens (or raises); ``stop()`` asks uvicorn to finish in-flight
requests and waits for the thread.

**HTTPS.** When ``settings.api_https`` (``api_tls``, on by default once ``tls_cert_file``
and ``tls_key_file`` are set) the port speaks TLS only (TLS 1.2 or later, BCP 195), with the
certificate and key of DICOM TLS loaded by :func:`node.tls.build_server_context` (no client
certificate asked: browsers connect). Plain HTTP on that port gets no answer. Every response
then carries ``Strict-Transport-Security`` (RFC 6797), and the login cookies are ``Secure``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

import uvicorn

from node.api.app import create_app
from node.services.context import ServiceContext
from node.settings import Settings, is_loopback

__all__ = ["HSTS", "ApiServer", "api_ssl_context", "make_api_server"]

log = logging.getLogger(__name__)

#: ``Strict-Transport-Security`` over HTTPS (RFC 6797 §6.1): one year, this host only
HSTS = "max-age=31536000"


class ApiServer:
    """uvicorn serving an app in a background thread.

    Parameters
    ----------
    app
        The ASGI application.
    host, port
        Where to listen.
    start_timeout
        Seconds ``start()`` waits for the socket to listen.
    ssl_context
        Serve HTTPS only, with this context (:func:`api_ssl_context`), and send HSTS.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        start_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.scheme = "https" if ssl_context is not None else "http"
        tls: dict[str, Any] = {}
        if ssl_context is not None:
            tls = {
                # uvicorn's documented hook for a ready-made context
                "ssl_context_factory": lambda _config, _default: ssl_context,
                "headers": [("Strict-Transport-Security", HSTS)],
            }
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
            server_header=False,
            **tls,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        """Whether the server listens."""
        return bool(self._server.started)

    def start(self) -> None:
        """Start serving; return when listening.

        Raises
        ------
        RuntimeError
            When uvicorn did not come up within ``start_timeout`` (e.g. the port is taken).
        """
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._server.run, name="api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise RuntimeError(f"admin API did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        log.info(
            "admin API listening on %s://%s:%d%s",
            self.scheme,
            self.host,
            self.port,
            "" if is_loopback(self.host) else " (not loopback: tokens required on every call)",
        )

    def stop(self) -> None:
        """Stop accepting, finish in-flight requests, wait for the thread."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._thread = None
        log.info("admin API stopped")


def api_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The admin API's TLS context, or ``None`` when it serves plain HTTP.

    Built from ``tls_cert_file`` / ``tls_key_file`` by :func:`node.tls.build_server_context`
    (TLS 1.2+), without asking for client certificates.

    Raises
    ------
    ConfigError
        The certificate or key is unreadable or invalid (naming the setting).
    """
    if not settings.api_https:
        return None
    from node.tls import build_server_context

    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    return build_server_context(
        cert_file=settings.tls_cert_file,
        key_file=settings.tls_key_file,
        ca_file=None,
        require_client_cert=False,
    )


def make_api_server(ctx: Any) -> ApiServer:
    """Component factory for ``run_node``: the admin API on ``api_host:api_port``.

    Parameters
    ----------
    ctx
        A :class:`node.runtime.service.NodeContext` (or an :class:`ServiceContext`).

    Raises
    ------
    ConfigError
        HTTPS is on and the certificate or key cannot be loaded.
    """
    api_ctx = ctx if isinstance(ctx, ServiceContext) else ServiceContext.from_node(ctx)
    settings = api_ctx.settings
    app = create_app(api_ctx)
    return ApiServer(
        app,
        host=settings.api_host,
        port=settings.api_port,
        ssl_context=api_ssl_context(settings),
    )
