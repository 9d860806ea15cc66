"""A job's history: one row per step, written in the step's own transaction.

Kinds (``JobEvent.kind``): ``received`` (the job was made for a receiving study),
``queued`` (the study completed; ``detail`` names the routing rule), ``claimed``
(``actor`` is the worker), ``stage`` (``detail``: ``name``, ``seconds``), ``drafted``,
``failed`` (``detail``: ``error`` class, ``retry``), ``delivery`` (``detail``:
``destination``, ``object``, ``outcome`` sent/retry/failed, ``error``), and operator
actions (``retry``, ``cancel``, ``resend``, ``withdraw``, ``review``; ``actor`` is the
token's name). ``detail`` never holds patient data or report text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import JobEvent, utcnow

__all__ = ["JobEventRow", "add_event", "job_events"]


def add_event(
    session: Session,
    job_id: int,
    kind: str,
    *,
    actor: str | None = None,
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> JobEvent:
    """Add one event of job ``job_id`` to the session (the caller commits)."""
    event = JobEvent(job_id=job_id, at=now or utcnow(), kind=kind, actor=actor, detail=detail)
    session.add(event)
    return event


@dataclass(frozen=True)
class JobEventRow:
    """One event of a job's history."""

    id: int
    at: datetime
    kind: str
    actor: str | None
    detail: dict[str, Any] | None


def job_events(session: Session, job_id: int) -> list[JobEventRow]:
    """The job's events in the order they were written."""
    return [
        JobEventRow(e.id, e.at, e.kind, e.actor, e.detail)
        for e in session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        )
    ]
