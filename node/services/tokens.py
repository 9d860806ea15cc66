"""API tokens and web-console sessions: secrets are random, stored only as SHA-256.

A token is ``cxr_`` + 43 URL-safe characters (32 random bytes from :mod:`secrets`); a
session id and a CSRF token are 32 random bytes each. A fast hash suffices for 256-bit
random secrets (nothing to brute-force) and allows an indexed lookup. Every change is
audited (``token.create``, ``token.revoke``, ``session.create``, ``session.end``).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from node.db import tokens as tokens_db
from node.db.models import ApiRole
from node.services.context import ServiceContext

__all__ = [
    "SESSION_LIFETIME",
    "TOKEN_PREFIX",
    "NewSession",
    "create_token",
    "end_session",
    "hash_secret",
    "list_tokens",
    "new_secret",
    "new_token",
    "open_session",
    "revoke_token",
]

TOKEN_PREFIX = "cxr_"
SESSION_LIFETIME = timedelta(hours=12)


def new_token() -> str:
    """A new random API token (``cxr_`` + 32 random bytes, URL-safe base64)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_secret() -> str:
    """A random 256-bit secret (session id, CSRF token)."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """SHA-256 (hex) of a token or session secret, as stored in the database."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(
    ctx: ServiceContext, *, name: str, role: ApiRole | str, actor: str
) -> tuple[tokens_db.TokenRow, str]:
    """Create a token; return its row and the secret (shown once, stored hashed).

    Raises
    ------
    ValueError
        For an unknown role or an unusable name.
    """
    secret = new_token()
    with ctx.write_sessions() as session:
        row = tokens_db.create_token(
            session, name=name, role=role, token_hash=hash_secret(secret), actor=actor
        )
    return row, secret


def revoke_token(ctx: ServiceContext, token_id: int, *, actor: str) -> tokens_db.TokenRow:
    """Revoke a token and end its web sessions (idempotent).

    Raises
    ------
    LookupError
        When no token has that id.
    """
    with ctx.write_sessions() as session:
        return tokens_db.revoke_token(session, token_id, actor=actor)


def list_tokens(ctx: ServiceContext) -> list[tokens_db.TokenRow]:
    """Every token (never its secret or hash), oldest first."""
    with ctx.read_sessions() as session:
        return tokens_db.list_tokens(session)


@dataclass(frozen=True)
class NewSession:
    """A web-console session just opened: the secrets go to the browser only."""

    session_id: str
    csrf_token: str
    expires_at: datetime


def open_session(ctx: ServiceContext, token_id: int, *, actor: str) -> NewSession:
    """Open a web-console session for an authenticated token (lifetime
    :data:`SESSION_LIFETIME`)."""
    sid, csrf = new_secret(), new_secret()
    with ctx.write_sessions() as session:
        expires = tokens_db.create_session(
            session,
            token_id=token_id,
            session_hash=hash_secret(sid),
            csrf_hash=hash_secret(csrf),
            lifetime=SESSION_LIFETIME,
            actor=actor,
        )
    return NewSession(sid, csrf, expires)


def end_session(ctx: ServiceContext, session_id: str, *, actor: str) -> bool:
    """End a web-console session (log out); ``False`` when it was not open."""
    with ctx.write_sessions() as session:
        return tokens_db.end_session(session, hash_secret(session_id), actor=actor)
