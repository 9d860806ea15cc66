"""Authentication and roles of the admin API and the web console.

**Tokens.** A token is ``cxr_`` + 43 URL-safe characters (32 random bytes from
:mod:`secrets`). Only its SHA-256 is stored (``api_tokens.token_hash``, unique). A fast
hash is enough here, unlike for passwords: a 256-bit random secret cannot be guessed or
brute-forced from its hash, so a slow KDF (bcrypt, argon2) would add cost and no safety,
and a plain digest allows an indexed lookup. Tokens are sent as
``Authorization: Bearer <token>``. Roles are ordered ``viewer < operator < admin``.

**Web sessions.** ``POST /api/session`` with a token sets two cookies: ``cxr_session``
(``HttpOnly``, ``SameSite=Strict``, ``Secure`` over https) holding a fresh 256-bit
random session id, and ``cxr_csrf`` (readable by the page's JavaScript) holding a CSRF
token also returned in the JSON body. The server keeps only SHA-256 hashes of both
(``api_sessions``), so the cookie value cannot be forged: an unguessable server-side id
needs no signature. Sessions expire after :data:`node.services.tokens.SESSION_LIFETIME`,
end on logout, and die with their token's revocation.

**CSRF.** A request authenticated by the cookie with an unsafe method (anything but GET,
HEAD, OPTIONS) must carry ``X-CSRF-Token`` equal to the session's CSRF token (checked
against the stored hash, so it is the double-submit pattern bound to the session) or it
is refused with 403. Bearer requests are immune: browsers never add the header by
themselves. ``SameSite=Strict`` is the second line of defence.

**Failed authentication** (a wrong or malformed bearer token, a failed login) is logged
with the client's address and the reason, never the presented secret, and audited as
``auth.failed`` (actor ``client:<address>``); past ``api_auth_max_failures`` per
``api_auth_window_seconds`` an address gets 429 with ``Retry-After`` instead, and one
``auth.throttled`` row (:mod:`node.api.limits`). An unknown or expired session cookie is
answered 401 without counting: every browser sends one after its session ends.

Audit rows name the caller as ``token:<id>:<name>`` (:attr:`Principal.actor`).
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from node.api.context import api_context
from node.api.errors import ApiError
from node.api.limits import PRINCIPAL_STATE, FailedAuthLimiter, client_key
from node.db import audit as audit_db
from node.db import tokens as tokens_db
from node.db.models import ApiRole, utcnow
from node.services.context import ServiceContext
from node.services.tokens import hash_secret

__all__ = [
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Principal",
    "authenticate",
    "authenticate_connection",
    "bearer_scheme",
    "failed_authentication",
    "require_role",
]

log = logging.getLogger(__name__)

SESSION_COOKIE = "cxr_session"
CSRF_COOKIE = "cxr_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_SECRET = 256

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API token: `Authorization: Bearer cxr_...` (`cxr-node tokens create`).",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token, its role, and how it authenticated."""

    token_id: int
    name: str
    role: ApiRole
    via: str  # "bearer" or "cookie"

    @property
    def actor(self) -> str:
        """The audit-log ``actor``: ``token:<id>:<name>``."""
        return f"token:{self.token_id}:{self.name}"[:128]

    def has(self, role: ApiRole | str) -> bool:
        """Whether this principal's role is ``role`` or stronger; only a reviewer has
        ``reviewer``."""
        needed = ApiRole(role)
        if needed is ApiRole.reviewer:
            return self.role is ApiRole.reviewer
        return self.role.rank >= needed.rank


def _unauthorized(reason: str) -> ApiError:
    return ApiError(401, reason, headers={"WWW-Authenticate": 'Bearer realm="cxr-node"'})


def token_principal(
    ctx: ServiceContext,
    token: str,
    *,
    via: str = "bearer",
    conn: HTTPConnection | None = None,
    kind: str = "bearer",
) -> Principal:
    """Look up an API token; raise 401 when it is unknown or revoked.

    With ``conn``, a failure is a failed authentication of that request's client
    (:func:`failed_authentication`: logged, audited, and 429 once over the limit); ``kind``
    names it in the log and the audit row (``bearer`` or ``login``).
    """
    reason = "invalid or revoked API token"
    row = None
    if token and len(token) <= _MAX_SECRET:
        with ctx.read_sessions() as session:
            row = tokens_db.token_by_hash(session, hash_secret(token))
    if row is None:
        if conn is not None:
            raise failed_authentication(conn, ctx, reason, kind=kind)
        raise _unauthorized(reason)
    _touch(ctx, row)
    return Principal(row.id, row.name, ApiRole(row.role), via)


def failed_authentication(
    conn: HTTPConnection, ctx: ServiceContext, reason: str, *, kind: str
) -> ApiError:
    """Count, log and audit a failed authentication; return the error to raise.

    The client (:func:`node.api.limits.client_key`) is charged one failure in the app's
    :class:`~node.api.limits.FailedAuthLimiter` (``app.state.auth_limiter``). Within its
    limit: a log line (address, kind, reason; never the presented secret), an ``auth.failed``
    audit row, and 401. Over it: 429 with ``Retry-After`` (RFC 6585 §4), logged and audited
    (``auth.throttled``) only on the first refusal of a run.

    Parameters
    ----------
    conn
        The request (headers, client address, app).
    ctx
        The API context (for the audit row).
    reason
        Why authentication failed; returned to the client and logged. Holds no secret.
    kind
        ``bearer`` (an ``Authorization`` header) or ``login`` (``POST /api/session``).
    """
    client = client_key(conn)
    limiter = getattr(getattr(conn.scope.get("app"), "state", None), "auth_limiter", None)
    verdict = limiter.failure(client) if isinstance(limiter, FailedAuthLimiter) else None
    detail: dict[str, object] = {"kind": kind, "reason": reason, "method": conn.scope["method"]}
    if verdict is None or verdict.allowed:
        log.warning("failed %s authentication from %s: %s", kind, client, reason)
        _audit_failure(ctx, client, "auth.failed", detail)
        return _unauthorized(reason)
    wait = max(1, math.ceil(verdict.retry_after))
    if verdict.first_refusal and isinstance(limiter, FailedAuthLimiter):
        if verdict.scope == "address":
            log.warning(
                "too many failed authentications from %s (more than %d per %g s): answering 429",
                client,
                limiter.max_failures,
                limiter.window_seconds,
            )
        else:
            log.warning(
                "too many failed authentications from all addresses together (more than %d "
                "per %g s; the latest from %s): answering 429",
                limiter.max_failures * limiter.GLOBAL_FACTOR,
                limiter.window_seconds,
                client,
            )
        extra = {"retry_after": wait, "scope": verdict.scope}
        _audit_failure(ctx, client, "auth.throttled", {**detail, **extra})
    who = "this address" if verdict.scope == "address" else "all clients together"
    return ApiError(
        429,
        f"too many failed authentications from {who}: retry in {wait} s",
        headers={"Retry-After": str(wait)},
    )


def _audit_failure(
    ctx: ServiceContext, client: str, action: str, detail: dict[str, object]
) -> None:
    try:
        with ctx.write_sessions() as session:
            audit_db.audit(session, actor=f"client:{client}"[:128], action=action, detail=detail)
    except Exception as exc:  # bookkeeping only: the refusal stands without its audit row
        log.warning("could not audit %s from %s: %s", action, client, type(exc).__name__)


def _touch(ctx: ServiceContext, row: tokens_db.TokenRow) -> None:
    now = utcnow()
    if row.last_used_at is not None and now - row.last_used_at < timedelta(seconds=60):
        return
    try:
        with ctx.write_sessions() as session:
            tokens_db.touch_token(session, row.id, now=now)
    except Exception as exc:  # bookkeeping only: never fail the request for it
        log.warning("could not record use of API token %s: %s", row.id, type(exc).__name__)


def authenticate(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    ctx: ServiceContext = Depends(api_context),
) -> Principal:
    """FastAPI dependency: the caller, from the bearer token or the session cookie.

    The caller that :class:`node.api.limits.AuthBeforeBody` authenticated before the body
    was read is reused; otherwise :func:`authenticate_connection` runs now. ``credentials``
    only declares the bearer scheme in the OpenAPI schema.

    Raises
    ------
    ApiError
        401 without valid credentials; 403 for a cookie-authenticated unsafe request whose
        ``X-CSRF-Token`` header is missing or wrong; 429 for a failure from a client over
        its limit of failed authentications.
    """
    known = getattr(request.state, PRINCIPAL_STATE, None)
    if isinstance(known, Principal):
        return known
    return authenticate_connection(request, ctx)


def authenticate_connection(conn: HTTPConnection, ctx: ServiceContext) -> Principal:
    """The caller of a request, from its headers alone (never its body).

    ``Authorization: Bearer <token>`` (RFC 6750 §2.1), else the session cookie; for an
    unsafe method with the cookie, the ``X-CSRF-Token`` header too. A wrong or malformed
    bearer token is a failed authentication (:func:`failed_authentication`).

    Raises
    ------
    ApiError
        As :func:`authenticate`.
    """
    header = conn.headers.get("authorization")
    if header is not None:
        scheme, token = get_authorization_scheme_param(header)
        if scheme.lower() != "bearer" or not token:
            raise failed_authentication(
                conn, ctx, "Authorization header must be 'Bearer <token>'", kind="bearer"
            )
        return token_principal(ctx, token, conn=conn)
    sid = conn.cookies.get(SESSION_COOKIE)
    if not sid:
        raise _unauthorized("authentication required: send 'Authorization: Bearer <token>'")
    if len(sid) > _MAX_SECRET:
        raise _unauthorized("session expired or ended: log in again")
    with ctx.read_sessions() as session:
        found = tokens_db.active_session(session, hash_secret(sid))
    if found is None:
        raise _unauthorized("session expired or ended: log in again")
    row, csrf_hash = found
    if str(conn.scope.get("method", "GET")).upper() not in SAFE_METHODS:
        sent = conn.headers.get(CSRF_HEADER, "")
        if (
            not sent
            or len(sent) > _MAX_SECRET
            or not hmac.compare_digest(hash_secret(sent), csrf_hash)
        ):
            raise ApiError(403, f"CSRF check failed: send the {CSRF_HEADER} header of the session")
    return Principal(row.id, row.name, ApiRole(row.role), "cookie")


def require_role(role: ApiRole | str) -> Callable[..., Principal]:
    """A FastAPI dependency admitting callers with ``role`` or a stronger one (else 403).

    Use as ``principal: Principal = Depends(require_role("operator"))``.
    """
    needed = ApiRole(role)

    def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if not principal.has(needed):
            raise ApiError(
                403, f"role {needed.value} required; this token has role {principal.role.value}"
            )
        return principal

    dependency.__name__ = f"require_{needed.value}"
    return dependency
