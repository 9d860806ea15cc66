"""The console's Rules page: the routing rules (first match wins) and a dry-run form.

The page shows the rule set as :func:`node.services.routing.rule_set` gives it (the same as
``GET /api/rules``); the dry-run form (``static/rules.js``, no inline script) posts a stored
study's UID as JSON, or a DICOM file as multipart, to ``POST /api/rules/dry-run`` with the
CSRF header, and shows which rule matched and why. Viewers see the rules; the dry-run needs
operator (the API enforces it whatever the page shows).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from node.services import routing as routing_service
from node.web import frame

__all__ = ["DRY_RUN_API", "router"]

router = APIRouter(include_in_schema=False)

DRY_RUN_API = "/api/rules/dry-run"


@router.get("/rules", name="web_rules", response_class=HTMLResponse)
def rules_page(request: Request, user: frame.PageUser) -> Response:
    """The routing rules and the dry-run form."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    return frame.render(
        request,
        "rules.html",
        page="rules",
        title="Routing rules",
        user=user,
        rules=routing_service.rule_set(ctx),
        can_operate=user.has("operator"),
        dry_run_api=DRY_RUN_API,
        max_upload_mb=ctx.settings.api_max_upload_mb,
    )
