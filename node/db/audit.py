"""The audit log: who did what to which target, written in the action's own transaction.

``detail`` never holds patient data or report text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import AuditLog, utcnow
from node.db.queries import page
from node.db.tx import in_transaction

__all__ = [
    "AuditEntry",
    "AuditFilter",
    "add_audit",
    "audit",
    "audit_actions",
    "audit_entries",
    "audit_row",
]


def add_audit(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditLog:
    entry = AuditLog(at=now or utcnow(), actor=actor, action=action, target=target, detail=detail)
    session.add(entry)
    return entry


def audit(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditLog:
    """Append an audit-log entry (no patient data in ``detail``). Commits."""
    return in_transaction(
        session,
        lambda: add_audit(session, actor=actor, action=action, target=target, detail=detail),
    )


@dataclass(frozen=True)
class AuditEntry:
    """An audit-log row."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    detail: dict[str, Any] | None


def audit_row(a: AuditLog) -> AuditEntry:
    return AuditEntry(a.id, a.at, a.actor, a.action, a.target, a.detail)


@dataclass(frozen=True)
class AuditFilter:
    """Which audit rows to list, newest first.

    Parameters
    ----------
    actor, action, target
        Match exactly; ``None`` or empty: no filter.
    since, until
        ``at`` on or after / before (UTC).
    limit, offset
        The page.
    """

    actor: str | None = None
    action: str | None = None
    target: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100
    offset: int = 0

    def conditions(self) -> list[Any]:
        """The SQL conditions of the filter (all must hold)."""
        conds: list[Any] = [
            column == value
            for column, value in (
                (AuditLog.actor, self.actor),
                (AuditLog.action, self.action),
                (AuditLog.target, self.target),
            )
            if value
        ]
        if self.since is not None:
            conds.append(AuditLog.at >= self.since)
        if self.until is not None:
            conds.append(AuditLog.at < self.until)
        return conds


def audit_entries(session: Session, flt: AuditFilter) -> tuple[list[AuditEntry], int]:
    """Audit rows matching ``flt``, newest first, with the total number of matches."""
    rows, total = page(
        session,
        select(AuditLog).where(*flt.conditions()),
        order_by=(AuditLog.id.desc(),),
        limit=flt.limit,
        offset=flt.offset,
    )
    return [audit_row(a) for a in rows.scalars()], total


def audit_actions(session: Session) -> list[str]:
    """The distinct actions present in the audit log, sorted (for a filter's choices)."""
    return list(session.scalars(select(AuditLog.action).distinct().order_by(AuditLog.action)))
