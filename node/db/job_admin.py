"""An admin's moves of a job: cancel it, or queue it again (audited ``job.cancel``,
``job.requeue``).

Each takes the job's lock (:func:`node.db.jobs.lock_job`), moves it through
:func:`node.db.jobs.transition` and writes its audit entry in one transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from node.db.audit import add_audit
from node.db.jobs import lock_job, transition
from node.db.models import Job, JobState
from node.db.tx import in_transaction

__all__ = ["CANCEL_REASON_MAX_LENGTH", "cancel_job", "check_cancel_reason", "requeue_job"]

#: the longest reason a cancellation takes (``POST /api/jobs/{id}/cancel``, ``cxr-node jobs
#: cancel --reason``)
CANCEL_REASON_MAX_LENGTH = 500


def check_cancel_reason(reason: str | None) -> str | None:
    """``reason`` when a cancellation takes it (optional, no patient data).

    Raises
    ------
    ValueError
        A reason over :data:`CANCEL_REASON_MAX_LENGTH` characters.
    """
    if reason is not None and len(reason) > CANCEL_REASON_MAX_LENGTH:
        raise ValueError(
            f"a reason is at most {CANCEL_REASON_MAX_LENGTH} characters, got {len(reason)}"
        )
    return reason


def cancel_job(session: Session, job_id: int, *, actor: str, reason: str | None = None) -> Job:
    """Cancel a job that has not finished (admin action, audited ``job.cancel``). Commits.

    The job's objects already queued and not sent are cancelled with it
    (:func:`node.db.jobs.transition`; named in the audit entry's ``deliveries``): a
    cancelled job's draft must not reach a receiver.

    Raises
    ------
    ValueError
        A ``reason`` :func:`check_cancel_reason` refuses (nothing changes).
    JobNotFound
        No job with that id.
    IllegalTransition
        The job is ``done`` (withdraw its draft instead) or ``cancelled`` already.
    """
    check_cancel_reason(reason)
    return _admin_move(
        session, job_id, JobState.cancelled, actor=actor, action="job.cancel", reason=reason
    )


def requeue_job(session: Session, job_id: int, *, actor: str) -> Job:
    """Queue a failed or cancelled job again with fresh attempts (admin action, audited
    ``job.requeue``). Commits."""
    return _admin_move(
        session, job_id, JobState.queued, actor=actor, action="job.requeue", reason=None
    )


def _admin_move(
    session: Session, job_id: int, to: JobState, *, actor: str, action: str, reason: str | None
) -> Job:
    def work() -> Job:
        job = lock_job(session, job_id)
        before = job.state.value
        cancelled = transition(job, to, actor=actor, detail={"action": action, "reason": reason})
        if to is JobState.queued:
            job.attempts = 0
        if reason:
            job.last_error = reason
        detail: dict[str, Any] = {"from": before, "to": to.value, "reason": reason}
        if cancelled:
            detail["deliveries"] = cancelled
        add_audit(session, actor=actor, action=action, target=f"job:{job_id}", detail=detail)
        return job

    return in_transaction(session, work)
