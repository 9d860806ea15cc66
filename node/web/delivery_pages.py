"""The console's Failures page: deliveries that failed for good, per destination, with the
last attempt's time and error; an operator re-sends one, or all of a destination's.

The figures are :func:`node.services.deliveries.failures`', the same as ``GET
/api/deliveries/failed``; the buttons post to ``POST /api/deliveries/resend`` (CSRF header,
operator role enforced by the API).
"""

from __future__ import annotations

import math
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from node.services import deliveries as delivery_service
from node.web.routes import PageUser, login_redirect, page_context, render

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50


@router.get("/failures", name="web_failures", response_class=HTMLResponse)
def failures_page(
    request: Request,
    user: PageUser,
    destination: Annotated[str, Query(max_length=512)] = "",
    page: Annotated[int, Query(ge=1, le=10**6)] = 1,
) -> Response:
    """Failed deliveries, newest attempt first, of all destinations or of one."""
    if user is None:
        return login_redirect(request)
    ctx = page_context(request)
    rows, total = delivery_service.failures(
        ctx, destination=destination or None, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE
    )
    base = str(request.app.url_path_for("web_failures"))

    def page_url(**changes: Any) -> str:
        merged = {"destination": destination, "page": page, **changes}
        kept = {k: v for k, v in merged.items() if v not in ("", None)}
        return base + ("?" + urlencode(kept) if kept else "")

    return render(
        request,
        "failures.html",
        page="failures",
        title="Failed deliveries",
        user=user,
        rows=rows,
        total=total,
        summary=delivery_service.failures_by_destination(ctx),
        destination=destination,
        page_no=page,
        pages=max(1, math.ceil(total / PAGE_SIZE)),
        page_url=page_url,
        can_operate=user.has("operator"),
        resend_api="/api/deliveries/resend",
    )
