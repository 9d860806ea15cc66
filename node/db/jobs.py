"""The job queue: the state machine, claims and leases, retries.

One job per study drafting; a job moves only through :func:`transition`
(:data:`ALLOWED_TRANSITIONS`). Workers claim the highest priority, oldest queued job
(:func:`claim_next_job`) under a lease they renew (:func:`heartbeat`); expired leases are
requeued (:func:`expire_leases`). An admin's cancel and re-queue are
:mod:`node.db.job_admin`. Commits per :mod:`node.db.tx`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, object_session

from node.db.job_events import add_event
from node.db.models import Delivery, Job, JobState, utcnow
from node.db.queries import cancel_unsent
from node.db.tx import in_transaction

__all__ = [
    "ACTIVE_JOB_STATES",
    "ALLOWED_TRANSITIONS",
    "TERMINAL_JOB_STATES",
    "IllegalTransition",
    "JobConflict",
    "JobNotFound",
    "LeaseLost",
    "active_job",
    "claim_next_job",
    "expire_leases",
    "fail_job",
    "heartbeat",
    "job_destinations",
    "lock_job",
    "mark_finished",
    "new_job",
    "owned_running",
    "release_leases",
    "transition",
]

log = logging.getLogger(__name__)

ACTIVE_JOB_STATES = (JobState.received, JobState.queued)
TERMINAL_JOB_STATES = (JobState.done, JobState.failed, JobState.cancelled)


ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.received: frozenset({JobState.queued, JobState.cancelled}),
    JobState.queued: frozenset({JobState.running, JobState.cancelled}),
    # running -> queued: lease expired, retry after a failure, or released at shutdown
    JobState.running: frozenset(
        {JobState.done, JobState.failed, JobState.queued, JobState.cancelled}
    ),
    # an admin may re-queue a failed or cancelled job; done is final (a late instance or a
    # re-run creates a new job instead)
    JobState.failed: frozenset({JobState.queued}),
    JobState.cancelled: frozenset({JobState.queued}),
    JobState.done: frozenset(),
}


class JobConflict(ValueError):
    """An action the job's present state does not allow (HTTP 409 in the API)."""


class IllegalTransition(JobConflict):
    """A job state change that the state machine forbids."""

    def __init__(self, job_id: int | None, current: JobState, target: JobState) -> None:
        allowed = ", ".join(sorted(s.value for s in ALLOWED_TRANSITIONS[current])) or "none"
        super().__init__(
            f"job {job_id}: illegal state transition {current.value} -> {target.value} "
            f"(allowed from {current.value}: {allowed})"
        )
        self.job_id = job_id
        self.current = current
        self.target = target


class JobNotFound(LookupError):
    """No job with that id."""


class LeaseLost(RuntimeError):
    """The caller no longer holds the lease of a running job (expired or taken over)."""


_EVENT_OF_STATE = {
    JobState.queued: "queued",
    JobState.running: "claimed",
    JobState.done: "done",
    JobState.failed: "failed",
    JobState.cancelled: "cancelled",
}

#: why a job's unsent objects are cancelled as it ends without a draft
_UNSENT_OF_STATE = {
    JobState.failed: "cancelled: the job failed before it was sent",
    JobState.cancelled: "cancelled: the job was cancelled before it was sent",
}


def active_job(session: Session, study_id: int) -> Job | None:
    """The study's newest job still ``received`` or ``queued`` (or running), locked."""
    return session.scalars(
        select(Job)
        .where(Job.study_id == study_id, Job.state.in_(ACTIVE_JOB_STATES))
        .order_by(Job.id.desc())
        .limit(1)
        .with_for_update()
    ).first()


def transition(
    job: Job,
    to: JobState | str,
    *,
    now: datetime | None = None,
    actor: str | None = None,
    detail: dict[str, Any] | None = None,
) -> list[int]:
    """Move ``job`` to state ``to``: the one place where job states change.

    Sets the matching timestamp (``queued_at``, ``started_at``, ``finished_at``) and
    ``updated_at``; clears the lease when leaving ``running`` and any retry back-off
    (``not_before``: :func:`fail_job` sets it again after its move). A job already in the
    database gets the move in its history (:mod:`node.db.job_events`: ``queued``,
    ``claimed`` by ``actor``, ``done``, ``failed``, ``cancelled``, with ``detail``) in the
    caller's transaction.

    A job that ends ``failed`` or ``cancelled`` has no draft, so its objects not sent yet
    are cancelled in the same transaction (:func:`node.db.queries.cancel_unsent`; their ids
    in the event's ``deliveries``): a job queues its objects just before it is marked done,
    and one re-queued after a lost lease keeps its earlier run's, so a failure or a cancel
    can come after its rows are queued. No sender claims them (only a done job's,
    :func:`node.db.delivery_claims.claim_due_deliveries`); cancelled, none waits for ever.

    Returns
    -------
    list[int]
        The delivery ids cancelled with the job (empty for any other move).

    Raises
    ------
    IllegalTransition
        When the move is not in :data:`ALLOWED_TRANSITIONS`.
    """
    target = JobState(to)
    current = JobState(job.state)
    if target not in ALLOWED_TRANSITIONS[current]:
        raise IllegalTransition(job.id, current, target)
    now = now or utcnow()
    job.state = target
    job.updated_at = now
    job.not_before = None
    if target is JobState.queued:
        job.queued_at = now
        job.finished_at = None
    elif target is JobState.running:
        job.started_at = now
    else:
        job.finished_at = now
    if current is JobState.running and target is not JobState.running:
        job.lease_owner = None
        job.lease_expires_at = None
    session = object_session(job)
    if session is None or job.id is None:
        return []
    cancelled: list[int] = []
    if target in (JobState.failed, JobState.cancelled):
        cancelled = [
            row.id
            for row in cancel_unsent(
                session, Delivery.job_id == job.id, why=_UNSENT_OF_STATE[target]
            )
        ]
        if cancelled:
            detail = {**(detail or {}), "deliveries": cancelled}
    add_event(session, job.id, _EVENT_OF_STATE[target], actor=actor, detail=detail, now=now)
    return cancelled


def new_job(study_id: int, now: datetime, *, max_attempts: int, priority: int = 0) -> Job:
    return Job(
        study_id=study_id,
        state=JobState.received,
        priority=priority,
        attempts=0,
        max_attempts=max_attempts,
        created_at=now,
        updated_at=now,
    )


def claim_next_job(
    session: Session,
    *,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
    model: str | None = None,
) -> Job | None:
    """Claim the next queued job (highest priority, then oldest ``queued_at``) for ``owner``.

    A job a routing rule gave to a model (``jobs.model``) is claimed only by a worker
    serving that model (``model``, the loaded bundle's ``model_name``); the others leave it
    queued. Without ``model`` only jobs for any model are claimed.

    A job waiting out a retry back-off (``not_before`` later than ``now``) is skipped. The job
    becomes ``running`` with a lease until ``now + lease_seconds``; ``attempts`` is
    incremented. PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent workers
    get different jobs; SQLite: the ``BEGIN IMMEDIATE`` transaction serializes claims.
    Commits. Returns ``None`` when nothing is queued.
    """
    if not owner:
        raise ValueError("lease owner must not be empty")
    now = now or utcnow()

    def work() -> Job | None:
        job = session.scalars(
            select(Job)
            .where(
                Job.state == JobState.queued,
                or_(Job.not_before.is_(None), Job.not_before <= now),
                or_(Job.model.is_(None), Job.model == model) if model else Job.model.is_(None),
            )
            .order_by(Job.priority.desc(), Job.queued_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        ).first()
        if job is None:
            return None
        transition(job, JobState.running, now=now, actor=owner)
        job.attempts += 1
        job.lease_owner = owner
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        return job

    return in_transaction(session, work)


def job_destinations(session: Session, job_id: int) -> list[str] | None:
    """The destinations a routing rule chose for the job (``None``: every configured one)."""
    value = session.scalar(select(Job.destinations).where(Job.id == job_id))
    return None if value is None else [str(d) for d in value]


def heartbeat(
    session: Session,
    job_id: int,
    owner: str,
    lease_seconds: float,
    *,
    now: datetime | None = None,
) -> bool:
    """Extend the lease of a running job held by ``owner``; ``False`` if the lease is lost."""
    now = now or utcnow()

    def work() -> bool:
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.running, Job.lease_owner == owner)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(res, "rowcount", 0))

    return in_transaction(session, work)


def expire_leases(session: Session, now: datetime | None = None) -> int:
    """Requeue (or fail, when out of attempts) running jobs whose lease has passed.

    ``last_error`` says that the lease expired. Commits; returns the number of jobs.
    """
    now = now or utcnow()

    def work() -> int:
        jobs = session.scalars(
            select(Job)
            .where(Job.state == JobState.running, Job.lease_expires_at < now)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        ).all()
        for job in jobs:
            owner = job.lease_owner
            lapsed = {"lease_expired": owner}
            if job.attempts < job.max_attempts:
                transition(job, JobState.queued, now=now, detail=lapsed)
                job.last_error = (
                    f"lease of {owner} expired (attempt {job.attempts}/{job.max_attempts}); "
                    "requeued"
                )
            else:
                transition(job, JobState.failed, now=now, detail=lapsed)
                job.last_error = (
                    f"lease of {owner} expired on the last attempt "
                    f"({job.attempts}/{job.max_attempts})"
                )
            log.warning("job %s: %s", job.id, job.last_error)
        return len(jobs)

    return in_transaction(session, work)


def release_leases(session: Session, owner: str, *, now: datetime | None = None) -> int:
    """Give back the running jobs of ``owner`` (clean shutdown): they are queued again.

    The interrupted attempt is not counted. Commits; returns the number of jobs.
    """
    now = now or utcnow()

    def work() -> int:
        jobs = session.scalars(
            select(Job)
            .where(Job.state == JobState.running, Job.lease_owner == owner)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).all()
        for job in jobs:
            transition(job, JobState.queued, now=now, actor=owner, detail={"released": True})
            job.attempts = max(0, job.attempts - 1)
            job.last_error = f"released by {owner} at shutdown"
        return len(jobs)

    return in_transaction(session, work)


def lock_job(session: Session, job_id: int) -> Job:
    """The job row, locked for update and freshly loaded.

    ``FOR NO KEY UPDATE`` on PostgreSQL, which a row referring to the job (a job event, a
    delivery) does not wait for: ``FOR UPDATE`` would deadlock a transaction that holds
    that row's lock first (a send recorded while its job is withdrawn).

    Raises
    ------
    JobNotFound
        No job has that id.
    """
    job = session.scalars(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    ).first()
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return job


def owned_running(session: Session, job_id: int, owner: str) -> Job:
    """Lock running job ``job_id``; raise :class:`LeaseLost` unless ``owner`` holds it."""
    job = lock_job(session, job_id)
    if job.state is not JobState.running or job.lease_owner != owner:
        raise LeaseLost(f"job {job_id}: {owner} does not hold its lease (state {job.state.value})")
    return job


def mark_finished(
    session: Session,
    job_id: int,
    *,
    owner: str,
    sr_sop_instance_uid: str | None = None,
    selected_sop_instance_uid: str | None = None,
    stages: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Job:
    """Mark a running job held by ``owner`` as ``done``, in the caller's transaction.

    ``stages``: the attempt's timings; each ``<stage>_s`` entry becomes a ``stage`` event
    of the job's history (``detail``: ``name``, ``seconds``), before ``done``.

    Raises
    ------
    LeaseLost
        When ``owner`` no longer holds the job.
    """
    job = owned_running(session, job_id, owner)
    if sr_sop_instance_uid is not None:
        job.sr_sop_instance_uid = sr_sop_instance_uid
    if selected_sop_instance_uid is not None:
        job.selected_sop_instance_uid = selected_sop_instance_uid
    for key, value in (stages or {}).items():
        if key.endswith("_s") and isinstance(value, int | float):
            add_event(
                session,
                job_id,
                "stage",
                actor=owner,
                detail={"name": key[:-2], "seconds": round(float(value), 4)},
                now=now,
            )
    transition(job, JobState.done, now=now, actor=owner)
    job.last_error = None
    return job


def fail_job(
    session: Session,
    job_id: int,
    *,
    owner: str,
    error: str,
    retry: bool = True,
    retry_delay: Callable[[int], float] | None = None,
    now: datetime | None = None,
) -> Job:
    """Record a failed attempt: requeue while attempts remain and ``retry``, else ``failed``.

    ``error`` must hold no patient data. Commits.

    Parameters
    ----------
    session
        A write session.
    job_id
        The running job.
    owner
        Its lease owner.
    error
        The reason, kept as ``last_error``.
    retry
        ``False`` for a permanent failure: ``failed`` at once, whatever attempts remain.
    retry_delay
        Seconds to wait after ``attempts`` failed attempts (the job's count so far) before
        the job may be claimed again; it is queued with ``not_before = now + delay`` and
        ``last_error`` says when. ``None``: claimable at once.
    now
        The current time.

    Raises
    ------
    LeaseLost
        When ``owner`` no longer holds the job.
    """
    now = now or utcnow()

    def work() -> Job:
        job = owned_running(session, job_id, owner)
        if retry and job.attempts < job.max_attempts:
            transition(
                job, JobState.queued, now=now, actor=owner, detail={"retry": True, "error": error}
            )
            job.last_error = error
            if retry_delay is not None:
                delay = max(0.0, float(retry_delay(job.attempts)))
                job.not_before = now + timedelta(seconds=delay)
                job.last_error = (
                    f"{error} (attempt {job.attempts}/{job.max_attempts}; retry not before "
                    f"{job.not_before.isoformat(timespec='seconds')})"
                )
        else:
            transition(job, JobState.failed, now=now, actor=owner, detail={"error": error})
            job.last_error = error
        return job

    return in_transaction(session, work)
