"""The FastAPI application of the node: ``create_app(ctx) -> FastAPI``.

Routes: ``/health`` (no auth), ``/ready`` and ``/metrics`` (viewer), ``/api/...`` (see
``node/api/routes_*.py``), the OpenAPI schema at ``/openapi.json`` (public: it describes the
API and holds no data), and the web console's router (``node.web.router``) when that package
is present. No ``/docs`` or ``/redoc`` pages: they load scripts from a CDN, which an
on-premises node must not depend on.
Layers: routes -> :mod:`node.services` -> repository (``node.db``); errors map to statuses
by type in :mod:`node.api.errors`.
Bounds against hostile clients (:mod:`node.api.limits`): unsafe ``/api/`` requests are
authenticated before their body is read, bodies are limited (JSON routes to
:data:`~node.api.limits.JSON_BODY_LIMIT`, the upload to ``api_max_upload_mb``), and failed
authentication is throttled per client address.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from node.api import (
    routes_admin,
    routes_chat,
    routes_deliveries,
    routes_health,
    routes_jobs,
    routes_models,
    routes_quality,
    routes_receive,
    routes_rules,
    routes_system,
)
from node.api.auth import authenticate_connection
from node.api.errors import install_error_handlers
from node.api.limits import JSON_BODY_LIMIT, AuthBeforeBody, FailedAuthLimiter
from node.services.context import ServiceContext
from node.services.images import MIB

__all__ = ["ServiceContext", "create_app"]

log = logging.getLogger(__name__)

API_VERSION = "1"


def create_app(ctx_like: Any, *, include_web: bool = True) -> FastAPI:
    """Build the application.

    Parameters
    ----------
    ctx_like
        An :class:`~node.api.context.ServiceContext` (settings, read-only and write session
        factories, model-host getter), or a :class:`node.runtime.service.NodeContext` (converted
        with :meth:`ServiceContext.from_node`).
    include_web
        Mount the web console's router (``node.web.router``) when it can be imported.
    """
    ctx = ctx_like if isinstance(ctx_like, ServiceContext) else ServiceContext.from_node(ctx_like)
    app = FastAPI(
        title="llm-cxr-node admin API",
        docs_url=None,
        redoc_url=None,
        version=API_VERSION,
        description=(
            "Jobs, tokens, audit, and the LLM-CXR model's interactive tasks. Every route but "
            "`/health` needs `Authorization: Bearer <token>` (or the web console's session "
            "cookie plus `X-CSRF-Token` on unsafe methods). Roles: viewer < operator < admin. "
            "Model outputs are AI generated, unverified drafts."
        ),
    )
    app.state.api = ctx
    settings = ctx.settings
    app.state.auth_limiter = FailedAuthLimiter(
        settings.api_auth_max_failures, settings.api_auth_window_seconds
    )
    install_error_handlers(app)
    routers = (
        routes_health,
        routes_jobs,
        routes_deliveries,
        routes_receive,
        routes_admin,
        routes_system,
        routes_models,
        routes_quality,
        routes_chat,
    )
    for module in routers:
        app.include_router(module.router, max_body_size=JSON_BODY_LIMIT)
    app.include_router(routes_models.upload_router, max_body_size=settings.api_max_upload_mb * MIB)
    app.include_router(routes_rules.router, max_body_size=settings.api_max_upload_mb * MIB)
    app.include_router(routes_chat.upload_router, max_body_size=settings.api_max_upload_mb * MIB)
    if include_web:
        try:
            from node.web import router as web_router
        except ImportError as exc:
            log.info("web console not included: %s", exc)
        else:
            app.include_router(web_router, max_body_size=JSON_BODY_LIMIT)
    # Not FastAPI(max_body_size=...): that limit sits outside this middleware and would
    # turn its 401 for a large anonymous upload into a 413.
    app.add_middleware(
        AuthBeforeBody,
        authenticate=lambda conn: authenticate_connection(conn, ctx),
        public=[("POST", "/api/session")],
    )
    return app
