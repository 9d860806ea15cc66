"""The console's Failures page: deliveries that failed for good, per destination, with the
last attempt's time and error; an operator re-sends one, or all of a destination's.

The figures are :func:`node.services.deliveries.failures`', the same as ``GET
/api/deliveries/failed``; the buttons post to ``POST /api/deliveries/resend`` (CSRF header,
operator role enforced by the API).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from node.services import deliveries as delivery_service
from node.web import frame

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50


@router.get("/failures", name="web_failures", response_class=HTMLResponse)
def failures_page(
    request: Request,
    user: frame.PageUser,
    destination: Annotated[str, Query(max_length=512)] = "",
    page: frame.PageNo = 1,
) -> Response:
    """Failed deliveries, newest attempt first, of all destinations or of one."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    rows, total = delivery_service.failures(
        ctx, destination=destination or None, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE
    )
    return frame.render(
        request,
        "failures.html",
        page="failures",
        title="Failed deliveries",
        user=user,
        rows=rows,
        summary=delivery_service.failures_by_destination(ctx),
        destination=destination,
        **frame.paging(
            request,
            "web_failures",
            {"destination": destination},
            page=page,
            per=PAGE_SIZE,
            total=total,
        ),
        can_operate=user.has("operator"),
        resend_api="/api/deliveries/resend",
    )
