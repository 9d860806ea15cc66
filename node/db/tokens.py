"""API tokens and web console sessions.

Secrets never reach this module: callers pass their SHA-256 (see :mod:`node.api.auth`).
Actions write their audit row in their own transaction and commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.db.audit import add_audit
from node.db.models import ApiRole, ApiSession, ApiToken, utcnow
from node.db.read_models import read_model
from node.db.tx import in_transaction

__all__ = [
    "NAME_MAX_LENGTH",
    "NAME_PATTERN",
    "TokenNotFound",
    "TokenRow",
    "active_session",
    "check_name",
    "create_session",
    "create_token",
    "end_session",
    "list_tokens",
    "revoke_token",
    "token_by_hash",
    "touch_token",
]

#: what a token's name may hold (``POST /api/tokens`` and ``cxr-node tokens create``): one
#: line of letters, digits, spaces and ``._@:-``, 1 to 128 characters
NAME_PATTERN = r"^[A-Za-z0-9 ._@:-]+$"
NAME_MAX_LENGTH = 128


def check_name(name: str) -> str:
    """A token's name as stored: ``name`` without its surrounding spaces.

    Raises
    ------
    ValueError
        When ``name`` is not 1 to :data:`NAME_MAX_LENGTH` characters of
        :data:`NAME_PATTERN`, or is only spaces (a name is refused, never cut short).
    """
    if len(name) > NAME_MAX_LENGTH or not re.fullmatch(NAME_PATTERN, name) or not name.strip():
        raise ValueError(
            f"a token name is 1 to {NAME_MAX_LENGTH} letters, digits, spaces and ._@:-, "
            "not only spaces"
        )
    return name.strip()


class TokenNotFound(LookupError):
    """No API token with that id (HTTP 404)."""

    http_status = 404


@dataclass(frozen=True)
class TokenRow:
    """An API token as listed (never its secret or hash)."""

    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, t: ApiToken) -> TokenRow:
        """Build from the ORM row."""
        return read_model(cls, t)


def create_token(
    session: Session, *, name: str, role: ApiRole | str, token_hash: str, actor: str
) -> TokenRow:
    """Store a new token (its SHA-256 only) and audit ``token.create``. Commits.

    Raises
    ------
    ValueError
        For an unknown role, a ``token_hash`` that is not a SHA-256 hex digest, or a name
        :func:`check_name` refuses.
    """
    role = ApiRole(role)
    if len(token_hash) != 64:
        raise ValueError("token_hash must be a SHA-256 hex digest")
    name = check_name(name)

    def work() -> TokenRow:
        now = utcnow()
        tok = ApiToken(name=name, role=role, token_hash=token_hash, created_at=now)
        session.add(tok)
        session.flush()
        add_audit(
            session,
            actor=actor,
            action="token.create",
            target=f"token:{tok.id}",
            detail={"name": name, "role": role.value},
            now=now,
        )
        return TokenRow.of(tok)

    return in_transaction(session, work)


def revoke_token(session: Session, token_id: int, *, actor: str) -> TokenRow:
    """Revoke a token and end its web sessions (idempotent); audit ``token.revoke``. Commits.

    Raises
    ------
    TokenNotFound
        When no token has that id.
    """

    def work() -> TokenRow:
        tok = session.scalars(
            select(ApiToken).where(ApiToken.id == token_id).with_for_update()
        ).first()
        if tok is None:
            raise TokenNotFound(f"API token {token_id} does not exist")
        now = utcnow()
        already = tok.revoked_at is not None
        if not already:
            tok.revoked_at = now
        session.execute(
            update(ApiSession)
            .where(ApiSession.token_id == token_id, ApiSession.ended_at.is_(None))
            .values(ended_at=now)
        )
        add_audit(
            session,
            actor=actor,
            action="token.revoke",
            target=f"token:{token_id}",
            detail={"name": tok.name, "already_revoked": already},
            now=now,
        )
        return TokenRow.of(tok)

    return in_transaction(session, work)


def list_tokens(session: Session) -> list[TokenRow]:
    """Every token, oldest first."""
    return [TokenRow.of(t) for t in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def token_by_hash(session: Session, token_hash: str) -> TokenRow | None:
    """The active (not revoked) token with this SHA-256, or ``None``."""
    tok = session.scalars(
        select(ApiToken).where(ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None))
    ).first()
    return TokenRow.of(tok) if tok is not None else None


def touch_token(
    session: Session, token_id: int, *, now: datetime | None = None, every_seconds: float = 60.0
) -> bool:
    """Set ``last_used_at`` unless it was set less than ``every_seconds`` ago. Commits.

    The throttle keeps read requests from taking the (SQLite) write lock on every call.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=every_seconds)

    def work() -> bool:
        res = session.execute(
            update(ApiToken)
            .where(
                ApiToken.id == token_id,
                (ApiToken.last_used_at.is_(None)) | (ApiToken.last_used_at < cutoff),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(res, "rowcount", 0))

    return in_transaction(session, work)


def create_session(
    session: Session,
    *,
    token_id: int,
    session_hash: str,
    csrf_hash: str,
    lifetime: timedelta,
    actor: str,
) -> datetime:
    """Open a web-console session for a token; audit ``session.create``. Returns its expiry."""

    def work() -> datetime:
        now = utcnow()
        expires = now + lifetime
        session.add(
            ApiSession(
                token_id=token_id,
                session_hash=session_hash,
                csrf_hash=csrf_hash,
                created_at=now,
                expires_at=expires,
            )
        )
        add_audit(
            session, actor=actor, action="session.create", target=f"token:{token_id}", now=now
        )
        return expires

    return in_transaction(session, work)


def active_session(
    session: Session, session_hash: str, *, now: datetime | None = None
) -> tuple[TokenRow, str] | None:
    """The token and CSRF hash of a live session (not ended, not expired, token not revoked)."""
    now = now or utcnow()
    row = session.execute(
        select(ApiToken, ApiSession.csrf_hash)
        .join(ApiSession, ApiSession.token_id == ApiToken.id)
        .where(
            ApiSession.session_hash == session_hash,
            ApiSession.ended_at.is_(None),
            ApiSession.expires_at > now,
            ApiToken.revoked_at.is_(None),
        )
    ).first()
    if row is None:
        return None
    return TokenRow.of(row[0]), str(row[1])


def end_session(session: Session, session_hash: str, *, actor: str) -> bool:
    """End a web session (log out); audit ``session.end``. Commits; ``False`` if none."""

    def work() -> bool:
        s = session.scalars(
            select(ApiSession).where(
                ApiSession.session_hash == session_hash, ApiSession.ended_at.is_(None)
            )
        ).first()
        if s is None:
            return False
        s.ended_at = utcnow()
        add_audit(session, actor=actor, action="session.end", target=f"token:{s.token_id}")
        return True

    return in_transaction(session, work)
