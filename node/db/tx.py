"""One transaction per state change, and the SQL dialect helpers.

Every function of :mod:`node.db` that changes state runs one transaction through
:func:`in_transaction` and commits it before returning (an acknowledged C-STORE, a claimed
job or a completed study must be durable when the call returns); on error it rolls back and
re-raises. Sessions come from :func:`node.db.engine.make_session_factory`: on SQLite every
write transaction starts with ``BEGIN IMMEDIATE`` (one writer at a time), on PostgreSQL rows
are locked with ``SELECT ... FOR UPDATE`` (``SKIP LOCKED`` where a concurrent worker or sweep
should move on to the next row). Policies are documented in ``docs/policies.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

__all__ = ["in_transaction", "insert_for", "is_pg"]
T = TypeVar("T")


def in_transaction(session: Session, fn: Callable[[], T]) -> T:
    try:
        result = fn()
        session.commit()
        return result
    except BaseException:
        session.rollback()
        raise


def is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert_for(session: Session) -> Callable[..., Any]:
    return pg_insert if is_pg(session) else sqlite_insert
