"""The console's link to the API's authentication (:mod:`node.api.auth`) and context.

Pages use :func:`optional_principal`: a browser without a valid session is sent to the
login page instead of receiving the API's 401 JSON. The console's own actions (C-ECHO, the
summary) use :func:`node.api.auth.authenticate` too, which checks the CSRF header for cookie
sessions on unsafe methods; the job actions are the API's routes.
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from node.api.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    Principal,
    authenticate,
    bearer_scheme,
    require_role,
)
from node.api.context import api_context
from node.api.errors import ApiError
from node.db.models import ApiRole
from node.services.context import ServiceContext

__all__ = [
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "GENERATE_IMAGE_API",
    "JOBS_API",
    "QUALITY_PAIRS_API",
    "SESSION_COOKIE",
    "VQA_API",
    "Principal",
    "api_context",
    "csrf_token",
    "job_action_urls",
    "optional_principal",
    "require_operator",
    "require_viewer",
]

# the API's JSON routes that the pages' script calls
JOBS_API = "/api/jobs"
VQA_API = "/api/studies/{study_uid}/vqa"  # the script fills in the study UID
QUALITY_PAIRS_API = "/api/quality/pairs"
GENERATE_IMAGE_API = "/api/generate-image"


#: the API's authentication (bearer token or session cookie + CSRF header) and role order
require_viewer = require_role(ApiRole.viewer)
require_operator = require_role(ApiRole.operator)


def optional_principal(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    ctx: ServiceContext = Depends(api_context),
) -> Principal | None:
    """FastAPI dependency for pages: the caller, or ``None`` when not (or no longer) logged in.

    Only safe methods use it, so the CSRF check of :func:`node.api.auth.authenticate` never
    applies; any other refusal (403) propagates.
    """
    try:
        return authenticate(request, credentials, ctx)
    except ApiError as exc:
        if exc.http_status == 401:
            return None
        raise


def csrf_token(request: Request) -> str:
    """The session's CSRF token as the browser holds it (the readable ``cxr_csrf`` cookie)."""
    value = request.cookies.get(CSRF_COOKIE, "")
    return value if len(value) <= 256 else ""


def job_action_urls(job_id: int) -> dict[str, str]:
    """The API routes behind a job page's Retry / Cancel / Re-send / Withdraw / Review
    buttons."""
    return {
        "retry": f"{JOBS_API}/{job_id}/retry",
        "cancel": f"{JOBS_API}/{job_id}/cancel",
        "resend": f"{JOBS_API}/{job_id}/resend",
        "withdraw": f"{JOBS_API}/{job_id}/withdraw",
        "review": f"{JOBS_API}/{job_id}/review",
    }
