"""Admin routes: tokens, configuration summary, audit log, counts, web-console sessions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from node.api.auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    Principal,
    authenticate,
    token_principal,
)
from node.api.deps import AUTH_ERRORS, Admin, Ctx, Limit, Offset, Operator, Viewer, utc
from node.api.schemas import (
    AuditPage,
    ErrorOut,
    SessionIn,
    SessionOut,
    TokenCreatedOut,
    TokenCreateIn,
)
from node.db.audit import AuditFilter
from node.db.models import ID_MAX
from node.db.tokens import TokenRow
from node.services import destinations as destination_service
from node.services import jobs as job_service
from node.services import tokens as token_service
from node.services.tokens import SESSION_LIFETIME

__all__ = ["router"]

router = APIRouter(prefix="/api", responses=AUTH_ERRORS)
TokenId = Annotated[int, Path(ge=1, le=ID_MAX, description="Token id.")]


@router.get("/tokens", response_model=list[TokenRow], tags=["tokens"], summary="List tokens")
def list_tokens(ctx: Ctx, _p: Admin) -> list[TokenRow]:
    """Every token (never the secret), oldest first (admin)."""
    return token_service.list_tokens(ctx)


@router.post(
    "/tokens",
    response_model=TokenCreatedOut,
    status_code=201,
    tags=["tokens"],
    summary="Create a token (admin)",
)
def create_token(body: TokenCreateIn, ctx: Ctx, p: Admin) -> TokenCreatedOut:
    """Create a token; the secret is in this answer only (stored as its SHA-256). Audited."""
    row, secret = token_service.create_token(ctx, name=body.name, role=body.role, actor=p.actor)
    return TokenCreatedOut(**vars(row), token=secret)


@router.delete(
    "/tokens/{token_id}",
    response_model=TokenRow,
    tags=["tokens"],
    responses={404: {"model": ErrorOut, "description": "no such token"}},
    summary="Revoke a token (admin)",
)
def revoke_token(token_id: TokenId, ctx: Ctx, p: Admin) -> TokenRow:
    """Revoke a token and end its web sessions (idempotent). Audited."""
    return token_service.revoke_token(ctx, token_id, actor=p.actor)


@router.get("/config", tags=["node"], summary="Effective configuration, no secrets (admin)")
def config(ctx: Ctx, _p: Admin) -> dict[str, Any]:
    """``Settings.public_summary()``: the database password masked, destinations by their
    text form (which holds no token)."""
    return ctx.settings.public_summary()


@router.get("/status", tags=["node"], summary="Counts by state (viewer)")
def status(ctx: Ctx, _p: Viewer) -> dict[str, Any]:
    """Instances, studies, jobs and deliveries by state, spool bytes."""
    return job_service.counts(ctx).to_dict()


@router.get("/audit", response_model=AuditPage, tags=["audit"], summary="Audit log (viewer)")
def audit(
    ctx: Ctx,
    _p: Viewer,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    target: Annotated[str | None, Query(max_length=256)] = None,
    since: Annotated[datetime | None, Query(description="At or after (UTC).")] = None,
    until: Annotated[datetime | None, Query(description="Before (UTC).")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> AuditPage:
    """Every admin action (who, what, when, target), newest first; ``actor``, ``action``
    and ``target`` match exactly, ``since`` is inclusive and ``until`` exclusive."""
    flt = AuditFilter(
        actor=actor,
        action=action,
        target=target,
        since=utc(since),
        until=utc(until),
        limit=limit,
        offset=offset,
    )
    rows, total = job_service.audit_entries(ctx, flt)
    return AuditPage(
        total=total,
        limit=limit,
        offset=offset,
        items=rows,
    )


@router.post(
    "/destinations/{index}/echo",
    name="destination_echo",
    tags=["destinations"],
    responses={
        404: {"model": ErrorOut, "description": "no destination has that index"},
        409: {"model": ErrorOut, "description": "the destination is not DICOM DIMSE"},
    },
    summary="C-ECHO a configured DICOM destination (operator)",
)
def destination_echo(
    index: Annotated[int, Path(ge=0, le=10_000, description="Index in `destinations`.")],
    ctx: Ctx,
    p: Operator,
) -> dict[str, Any]:
    """C-ECHO configured destination ``index`` (Verification SOP Class, PS3.4 Annex A) with
    the node's TLS settings. Returns ``{"ok", "destination", "index"}``. Audited
    ``destination.echo``."""
    result = destination_service.echo(ctx, index, actor=p.actor)
    return {"ok": result.ok, "destination": result.destination, "index": index}


# --- web-console sessions --------------------------------------------------------------------


@router.post(
    "/session",
    response_model=SessionOut,
    tags=["session"],
    summary="Log in to the web console with a token (sets the session cookies)",
)
def login(body: SessionIn, request: Request, response: Response, ctx: Ctx) -> SessionOut:
    """Open a session: ``cxr_session`` (HttpOnly, SameSite=Strict) and ``cxr_csrf`` cookies,
    both ``Secure`` when the API serves HTTPS.

    Unsafe requests authenticated by the cookie must send ``X-CSRF-Token: <csrf_token>``. A
    wrong token is a failed login: logged (address, never the token), audited
    (``auth.failed``), and 429 with ``Retry-After`` past ``api_auth_max_failures``.
    """
    p = token_principal(ctx, body.token, via="cookie", conn=request, kind="login")
    opened = token_service.open_session(ctx, p.token_id, actor=p.actor)
    sid, csrf, expires = opened.session_id, opened.csrf_token, opened.expires_at
    secure = request.url.scheme == "https"
    max_age = int(SESSION_LIFETIME.total_seconds())
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )
    response.set_cookie(
        CSRF_COOKIE, csrf, max_age=max_age, httponly=False, samesite="strict", secure=secure
    )
    return SessionOut(
        csrf_token=csrf,
        token_id=p.token_id,
        name=p.name,
        role=p.role.value,
        via="cookie",
        expires_at=expires,
    )


@router.get("/session", response_model=SessionOut, tags=["session"], summary="Who am I")
def whoami(p: Annotated[Principal, Depends(authenticate)]) -> SessionOut:
    """The caller's token id, name and role."""
    return SessionOut(
        csrf_token=None,
        token_id=p.token_id,
        name=p.name,
        role=p.role.value,
        via=p.via,
        expires_at=None,
    )


@router.delete("/session", status_code=204, tags=["session"], summary="Log out")
def logout(request: Request, ctx: Ctx, p: Annotated[Principal, Depends(authenticate)]) -> Response:
    """End the cookie session (CSRF header required) and clear the cookies."""
    sid = request.cookies.get(SESSION_COOKIE)
    if sid and p.via == "cookie":
        token_service.end_session(ctx, sid, actor=p.actor)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE)
    return response
