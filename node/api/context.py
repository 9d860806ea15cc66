"""The API's access to the node: the :class:`~node.services.context.ServiceContext` of the
running app, as a FastAPI dependency."""

from __future__ import annotations

from fastapi import Request

from node.services.context import ServiceContext

__all__ = ["api_context"]


def api_context(request: Request) -> ServiceContext:
    """FastAPI dependency: the :class:`ServiceContext` of the running app."""
    ctx = request.app.state.api
    assert isinstance(ctx, ServiceContext)
    return ctx
