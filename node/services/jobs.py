"""Jobs as front ends see them: list, detail, retry, cancel, re-prioritise, re-send,
withdraw; the queue's counts and the audit log.

Every action is audited by the repository in the same transaction (``job.requeue``,
``job.cancel``, ``job.priority``, ``job.resend``, ``job.withdraw``).

Raises (every action)
---------------------
node.db.jobs.JobNotFound
    No job has that id.
node.db.jobs.JobConflict
    The job's state does not allow the action.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from integration.priority import MAX_PRIORITY, MIN_PRIORITY
from node.db import audit as audit_db
from node.db import deliveries as deliveries_db
from node.db import delivery_views, job_admin, study_views
from node.db import views as views_db
from node.services.context import ServiceContext
from node.services.errors import InvalidInput

if TYPE_CHECKING:
    from node.runtime.withdrawal import WithdrawResult

__all__ = [
    "BulkResult",
    "audit_entries",
    "bulk",
    "cancel",
    "counts",
    "destination_health",
    "detail",
    "lifecycle",
    "list_jobs",
    "recent_studies",
    "requeue",
    "resend",
    "set_priority",
    "viewer_link",
    "withdraw",
]

BULK_ACTIONS = ("retry", "cancel", "resend")


@dataclass(frozen=True)
class BulkResult:
    """What one job of a bulk action came to: ``ok``, or the ``error`` (no patient data)."""

    job_id: int
    ok: bool
    error: str | None = None


def list_jobs(ctx: ServiceContext, flt: views_db.JobFilter) -> tuple[list[views_db.JobRow], int]:
    """Jobs matching ``flt``, newest first, and the number of matches."""
    with ctx.read_sessions() as session:
        return views_db.filter_jobs(session, flt)


def detail(ctx: ServiceContext, job_id: int) -> views_db.JobDetail:
    """Everything known about a job: drafts, deliveries, audit, the study's SR chain."""
    with ctx.read_sessions() as session:
        return views_db.job_detail(session, job_id)


def lifecycle(job: views_db.JobRow) -> list[tuple[str, datetime | None, float | None]]:
    """A job's life-cycle points (received, queued, started, finished), each with the
    seconds until the next known point (``None`` where unknown)."""
    points = [
        ("received", job.created_at),
        ("queued", job.queued_at),
        ("started", job.started_at),
        ("finished", job.finished_at),
    ]
    out: list[tuple[str, datetime | None, float | None]] = []
    for k, (name, at) in enumerate(points):
        nxt = next((p for _, p in points[k + 1 :] if p is not None), None)
        secs = (nxt - at).total_seconds() if at is not None and nxt is not None else None
        out.append((name, at, secs))
    return out


def requeue(ctx: ServiceContext, job_id: int, *, actor: str) -> views_db.JobRow:
    """Queue a failed or cancelled job again with fresh attempts."""
    with ctx.write_sessions() as session:
        job_admin.requeue_job(session, job_id, actor=actor)
    return detail(ctx, job_id).job


def cancel(
    ctx: ServiceContext, job_id: int, *, actor: str, reason: str | None = None
) -> views_db.JobRow:
    """Cancel a received, queued or running job and its objects not yet sent
    (:func:`node.db.job_admin.cancel_job`; ``reason``: no patient data)."""
    with ctx.write_sessions() as session:
        job_admin.cancel_job(session, job_id, actor=actor, reason=reason)
    return detail(ctx, job_id).job


def set_priority(ctx: ServiceContext, job_id: int, priority: int, *, actor: str) -> views_db.JobRow:
    """Set a job's priority (higher is claimed first among queued jobs).

    Raises
    ------
    InvalidInput
        ``priority`` outside :data:`integration.priority.MIN_PRIORITY` ..
        :data:`~integration.priority.MAX_PRIORITY`, the range the rules give too.
    """
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidInput(
            f"priority must be within {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}"
        )
    with ctx.write_sessions() as session:
        return views_db.set_priority(session, job_id, priority, actor=actor)


def resend(ctx: ServiceContext, job_id: int, *, actor: str) -> list[int]:
    """Queue the job's objects again for their destinations and wake the senders.

    The same SOP Instance UIDs and message control IDs are sent again, so a receiver
    replaces or keeps, never duplicates. Returns the delivery ids queued again.
    """
    from node.runtime.delivery import wake_senders

    with ctx.write_sessions() as session:
        ids = deliveries_db.resend(session, job_id, actor=actor)
    wake_senders()
    return ids


def withdraw(ctx: ServiceContext, job_id: int, *, actor: str, reason: str) -> WithdrawResult:
    """Withdraw a job's sent draft from every destination
    (:func:`node.runtime.withdrawal.withdraw`)."""
    from node.runtime.withdrawal import withdraw as withdraw_draft

    return withdraw_draft(ctx.settings, ctx.write_sessions, job_id, actor=actor, reason=reason)


def counts(ctx: ServiceContext) -> views_db.StatusCounts:
    """Instances, studies, jobs and deliveries by state, and spool bytes."""
    with ctx.read_sessions() as session:
        return views_db.counts(session)


def audit_entries(
    ctx: ServiceContext, flt: audit_db.AuditFilter
) -> tuple[list[audit_db.AuditEntry], int]:
    """Audit rows matching every filter of ``flt``, newest first, and the number of
    matches (:func:`node.db.audit.audit_entries`)."""
    with ctx.read_sessions() as session:
        return audit_db.audit_entries(session, flt)


def recent_studies(ctx: ServiceContext, limit: int = 50) -> list[study_views.StudyChoice]:
    """The most recently received studies (for choosing one to ask about)."""
    with ctx.read_sessions() as session:
        return study_views.recent_studies(session, limit=limit)


def destination_health(
    ctx: ServiceContext, destinations: list[str]
) -> dict[str, delivery_views.DestinationHealth]:
    """Per destination: deliveries by state and the last success and failure."""
    with ctx.read_sessions() as session:
        return delivery_views.destination_health(session, destinations)


def bulk(
    ctx: ServiceContext, action: str, job_ids: Sequence[int], *, actor: str
) -> list[BulkResult]:
    """Apply ``action`` (``retry``, ``cancel`` or ``resend``) to each job, one transaction
    (and one audit entry) per job; a job that refuses does not stop the others.

    Raises
    ------
    InvalidInput
        An unknown action.
    """
    from node.db.jobs import JobConflict, JobNotFound

    if action not in BULK_ACTIONS:
        raise InvalidInput(f"action must be one of {', '.join(BULK_ACTIONS)}")
    out: list[BulkResult] = []
    for job_id in dict.fromkeys(job_ids):  # each once, in the order given
        try:
            if action == "retry":
                requeue(ctx, job_id, actor=actor)
            elif action == "cancel":
                cancel(ctx, job_id, actor=actor, reason="bulk cancel")
            else:
                resend(ctx, job_id, actor=actor)
        except (JobConflict, JobNotFound) as exc:
            out.append(BulkResult(job_id, False, str(exc)))
        else:
            out.append(BulkResult(job_id, True))
    return out


def viewer_link(ctx: ServiceContext, job: views_db.JobRow) -> str | None:
    """The study in the site's viewer (``viewer_url_template``), or ``None``."""
    from node.settings.values import viewer_url

    return viewer_url(
        ctx.settings.viewer_url_template, study_uid=job.study_uid, accession=job.accession_number
    )
