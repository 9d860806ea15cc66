"""The HTTP server component of ``cxr-node serve``: uvicorn in a thread.

:func:`make_api_server` builds an :class:`ApiServer` on ``settings.api_host`` /
``settings.api_port`` (loopback by default; ``CXR_NODE_API_HOST`` to change). ``start()``
returns once the socket listens (or raises); ``stop()`` asks uvicorn to finish in-flight
requests and waits for the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from node.api.app import create_app
from node.api.context import ApiContext
from node.settings import is_loopback

__all__ = ["ApiServer", "make_api_server"]

log = logging.getLogger(__name__)


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
    """

    def __init__(self, app: Any, *, host: str, port: int, start_timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
            server_header=False,
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
            "admin API listening on http://%s:%d%s",
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


def make_api_server(ctx: Any) -> ApiServer:
    """Component factory for ``run_node``: the admin API on ``api_host:api_port``.

    Parameters
    ----------
    ctx
        A :class:`node.service.NodeContext` (or an :class:`ApiContext`).
    """
    api_ctx = ctx if isinstance(ctx, ApiContext) else ApiContext.from_node(ctx)
    app = create_app(api_ctx)
    return ApiServer(app, host=api_ctx.settings.api_host, port=api_ctx.settings.api_port)
