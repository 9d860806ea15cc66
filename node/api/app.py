"""The FastAPI application of the node: ``create_app(ctx) -> FastAPI``.

Routes: ``/health`` (no auth), ``/ready`` and ``/metrics`` (viewer), ``/api/...`` (see
``node/api/routes_*.py``), the OpenAPI schema at ``/openapi.json`` (public: it describes the
API and holds no data), and the web console's router (``node.web.router``) when that package
is present. No ``/docs`` or ``/redoc`` pages: they load scripts from a CDN, which an
on-premises node must not depend on.
Layers: routes -> :mod:`node.api.services` -> repositories (``node.db.repo_api``,
``node.db.repository``); errors map to statuses in :mod:`node.api.errors`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from node.api import routes_admin, routes_health, routes_jobs, routes_models
from node.api.context import ApiContext
from node.api.errors import install_error_handlers

__all__ = ["ApiContext", "create_app"]

log = logging.getLogger(__name__)

API_VERSION = "1"


def create_app(ctx_like: Any, *, include_web: bool = True) -> FastAPI:
    """Build the application.

    Parameters
    ----------
    ctx_like
        An :class:`~node.api.context.ApiContext` (settings, read-only and write session
        factories, model-host getter), or a :class:`node.service.NodeContext` (converted
        with :meth:`ApiContext.from_node`).
    include_web
        Mount the web console's router (``node.web.router``) when it can be imported.
    """
    ctx = ctx_like if isinstance(ctx_like, ApiContext) else ApiContext.from_node(ctx_like)
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
    install_error_handlers(app)
    for module in (routes_health, routes_jobs, routes_admin, routes_models):
        app.include_router(module.router)
    if include_web:
        try:
            from node.web import router as web_router
        except ImportError as exc:
            log.info("web console not included: %s", exc)
        else:
            app.include_router(web_router)
    return app
