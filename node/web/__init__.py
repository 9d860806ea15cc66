"""The node's web console: server-rendered pages over the admin API (``node.api``).

``router`` (every page module's routes) is included by :func:`node.api.app.create_app`;
see :mod:`node.web.frame` for the shared page machinery.
"""

from fastapi import APIRouter

from node.web import (
    chat_pages,
    delivery_pages,
    job_pages,
    receive_pages,
    routes,
    rules_pages,
    system_pages,
)

__all__ = ["router"]

router = APIRouter(include_in_schema=False)
for _pages in (
    routes,
    job_pages,
    delivery_pages,
    receive_pages,
    rules_pages,
    system_pages,
    chat_pages,
):
    router.include_router(_pages.router)
