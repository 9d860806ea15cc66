"""All queries of the node: ingest bookkeeping, study completion, the job queue, status.

Functions that change state run one transaction and commit it themselves (an acknowledged
C-STORE, a claimed job or a completed study must be durable when the call returns); on error
they roll back and re-raise. Sessions come from :func:`node.db.engine.make_session_factory`:
on SQLite every write transaction starts with ``BEGIN IMMEDIATE`` (single writer at a time),
on PostgreSQL rows are locked with ``SELECT ... FOR UPDATE`` (``SKIP LOCKED`` where a
concurrent worker or sweep should move on to the next row). Policies are documented in
``docs/policies.md``.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from node.db.models import (
    AuditLog,
    Delivery,
    DeliveryState,
    Draft,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
    utcnow,
)
from node.runtime.assembly import SeriesFacts, evaluate_chest_rule
from node.runtime.spool import OUTPUTS_DIR
from node.settings import ChestRule

__all__ = [
    "ACTIVE_JOB_STATES",
    "ALLOWED_TRANSITIONS",
    "TERMINAL_JOB_STATES",
    "CompletionResult",
    "IllegalTransition",
    "InstanceRecord",
    "JobConflict",
    "JobNotFound",
    "LeaseLost",
    "RecordOutcome",
    "RecordResult",
    "StatusCounts",
    "audit",
    "cancel_job",
    "claim_next_job",
    "complete_quiet_studies",
    "counts",
    "expire_leases",
    "fail_job",
    "finish_job",
    "heartbeat",
    "owned_running",
    "purge_expired_studies",
    "record_instance",
    "record_instance_detailed",
    "release_leases",
    "requeue_job",
    "transition",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# --- job state machine ------------------------------------------------------------------

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
ACTIVE_JOB_STATES = (JobState.received, JobState.queued)
TERMINAL_JOB_STATES = (JobState.done, JobState.failed, JobState.cancelled)


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


def transition(job: Job, to: JobState | str, *, now: datetime | None = None) -> None:
    """Move ``job`` to state ``to``: the one place where job states change.

    Sets the matching timestamp (``queued_at``, ``started_at``, ``finished_at``) and
    ``updated_at``; clears the lease when leaving ``running`` and any retry back-off
    (``not_before``: :func:`fail_job` sets it again after its move).

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


def _in_transaction(session: Session, fn: Callable[[], T]) -> T:
    try:
        result = fn()
        session.commit()
        return result
    except BaseException:
        session.rollback()
        raise


def _new_job(study_id: int, now: datetime, *, max_attempts: int, priority: int = 0) -> Job:
    return Job(
        study_id=study_id,
        state=JobState.received,
        priority=priority,
        attempts=0,
        max_attempts=max_attempts,
        created_at=now,
        updated_at=now,
    )


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _insert(session: Session) -> Callable[..., Any]:
    return pg_insert if _is_pg(session) else sqlite_insert


# --- ingest -------------------------------------------------------------------------------

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _clip(value: str | None, n: int) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value[:n] if value else None


@dataclass(frozen=True)
class InstanceRecord:
    """A received, spooled and fsync'd SOP instance, as recorded by :func:`record_instance`.

    UIDs follow PS3.5 §9.1 (digits and dots, at most 64 characters). ``spool_path`` is
    relative to the spool directory. Free-text attributes are clipped to their column size.
    ``priority`` is the job priority the instance asks for (``integration.priority``: the
    order's Requested Procedure Priority and the site's rules), -1000..1000, higher first.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    study_description: str | None
    series_description: str | None
    view_position: str | None
    spool_path: str
    size_bytes: int
    sha256: str
    calling_ae: str | None
    received_at: datetime
    priority: int = 0

    def __post_init__(self) -> None:
        for name, concept in (
            ("study_uid", "Study Instance UID (0020,000D)"),
            ("series_uid", "Series Instance UID (0020,000E)"),
            ("sop_instance_uid", "SOP Instance UID (0008,0018)"),
            ("sop_class_uid", "SOP Class UID (0008,0016)"),
            ("transfer_syntax_uid", "Transfer Syntax UID (0002,0010)"),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
                raise ValueError(f"{concept} {value!r} is not a valid UID (PS3.5 §9.1)")
        if self.size_bytes < 0:
            raise ValueError(f"size_bytes must not be negative, got {self.size_bytes}")
        if not _SHA256.match(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if not self.spool_path or self.spool_path.startswith("/") or ".." in self.spool_path:
            raise ValueError(f"spool_path {self.spool_path!r} must be relative to the spool")
        if self.received_at.tzinfo is None:
            raise ValueError("received_at must be timezone-aware")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority must be an integer, got {self.priority!r}")
        if not -1000 <= self.priority <= 1000:
            raise ValueError(f"priority {self.priority} is outside -1000..1000")
        for name, n in (
            ("modality", 16),
            ("body_part_examined", 64),
            ("study_description", 64),
            ("series_description", 64),
            ("view_position", 16),
            ("calling_ae", 16),
        ):
            object.__setattr__(self, name, _clip(getattr(self, name), n))


class RecordOutcome(enum.StrEnum):
    """What :func:`record_instance` did with an instance (policy: ``docs/policies.md``)."""

    new = "new"
    duplicate_identical = "duplicate_identical"
    duplicate_replaced = "duplicate_replaced"
    late_for_finished_study = "late_for_finished_study"


@dataclass(frozen=True)
class RecordResult:
    """Detailed result of :func:`record_instance_detailed`.

    ``obsolete_spool_path`` is a spool file (relative) that the caller should delete after
    the commit: the just-written file of an identical duplicate when it lies elsewhere, or
    the replaced file of a changed duplicate. ``None`` when nothing is obsolete.
    """

    outcome: RecordOutcome
    instance_id: int
    study_id: int
    job_id: int | None
    obsolete_spool_path: str | None
    late: bool


def record_instance(
    session: Session, rec: InstanceRecord, *, job_max_attempts: int = 3
) -> RecordOutcome:
    """Record a spooled instance in one committed transaction (called by the C-STORE handler).

    See :func:`record_instance_detailed`; this returns the outcome only.
    """
    return record_instance_detailed(session, rec, job_max_attempts=job_max_attempts).outcome


def record_instance_detailed(
    session: Session, rec: InstanceRecord, *, job_max_attempts: int = 3
) -> RecordResult:
    """Record a spooled, fsync'd instance, its series and study, and the study's job.

    One transaction, committed before returning, so the C-STORE success status (PS3.4
    B.2.3) may be sent afterwards. Policies (``docs/policies.md``):

    - first instance of a study: the study (``receiving``) and a job in ``received``;
    - same SOP Instance UID and same SHA-256: ``duplicate_identical``, nothing rewritten;
    - same SOP Instance UID, other content: the newest file wins, ``duplicate_replaced``;
    - instance of a study whose job is still ``received``/``queued``: joins that job, and
      raises its priority to ``rec.priority`` when that is higher (never lowers it);
    - instance of a completed or skipped study with no such job (its job is running, done,
      failed or cancelled): the study is reopened and a fresh ``received`` job is created,
      queued again after the quiet period (``late_for_finished_study``); a replaced
      duplicate of such a study reopens it the same way;
    - a job created here gets the priority ``rec.priority``.

    Parameters
    ----------
    session
        A write session (SQLite: ``BEGIN IMMEDIATE``).
    rec
        The instance.
    job_max_attempts
        ``max_attempts`` of a job created here.
    """
    return _in_transaction(session, lambda: _record(session, rec, job_max_attempts))


def _lock_study(session: Session, rec: InstanceRecord) -> Study:
    now = rec.received_at
    stmt = (
        _insert(session)(Study)
        .values(
            study_instance_uid=rec.study_uid,
            state=StudyState.receiving.value,
            study_description=rec.study_description,
            calling_ae=rec.calling_ae,
            instance_count=0,
            series_count=0,
            first_received_at=now,
            last_received_at=now,
            receiving_since=now,
            forced_completion=False,
        )
        .on_conflict_do_nothing(index_elements=["study_instance_uid"])
    )
    session.execute(stmt)
    study = session.scalars(
        select(Study)
        .where(Study.study_instance_uid == rec.study_uid)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    return study


def _lock_series(session: Session, rec: InstanceRecord, study: Study) -> tuple[Series, bool]:
    now = rec.received_at
    res = session.execute(
        _insert(session)(Series)
        .values(
            study_id=study.id,
            series_instance_uid=rec.series_uid,
            modality=rec.modality,
            body_part_examined=rec.body_part_examined,
            series_description=rec.series_description,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        .returning(Series.id)
    )
    created = res.first() is not None
    series = session.scalars(
        select(Series)
        .where(Series.series_instance_uid == rec.series_uid)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    return series, created


def _active_job(session: Session, study_id: int) -> Job | None:
    return session.scalars(
        select(Job)
        .where(Job.study_id == study_id, Job.state.in_(ACTIVE_JOB_STATES))
        .order_by(Job.id.desc())
        .limit(1)
        .with_for_update()
    ).first()


def _attach_to_job(
    session: Session, study: Study, now: datetime, job_max_attempts: int, priority: int
) -> tuple[Job, bool]:
    """Return the study's active job, reopening a finished study if there is none.

    A new job gets ``priority``; an active one is raised to it when it is higher (a STAT
    instance of a routine study), never lowered.
    """
    job = _active_job(session, study.id)
    reopened = False
    if job is None:
        if study.state is not StudyState.receiving:
            reopened = True
            study.state = StudyState.receiving
            study.skip_reason = None
            study.forced_completion = False
            study.receiving_since = now
        job = _new_job(study.id, now, max_attempts=job_max_attempts, priority=priority)
        session.add(job)
        session.flush()
    elif priority > job.priority:
        log.info("job %s: priority raised from %d to %d", job.id, job.priority, priority)
        job.priority = priority
        job.updated_at = now
    return job, reopened


def _record(session: Session, rec: InstanceRecord, job_max_attempts: int) -> RecordResult:
    now = rec.received_at
    study = _lock_study(session, rec)
    existing = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid).with_for_update()
    ).first()

    if (
        existing is not None
        and existing.sha256 == rec.sha256
        and existing.size_bytes == (rec.size_bytes)
    ):
        obsolete = rec.spool_path if rec.spool_path != existing.spool_path else None
        active = _active_job(session, existing.study_id)
        log.info(
            "duplicate SOP instance %s (study %s): identical content, kept as is",
            rec.sop_instance_uid,
            rec.study_uid,
        )
        return RecordResult(
            RecordOutcome.duplicate_identical,
            existing.id,
            existing.study_id,
            active.id if active else None,
            obsolete,
            existing.late,
        )

    outcome = RecordOutcome.new
    obsolete = None
    if existing is not None:
        outcome = RecordOutcome.duplicate_replaced
        if existing.spool_path != rec.spool_path:
            obsolete = existing.spool_path
        if existing.study_id != study.id:
            # the instance moved to another study: forget the old row, record it afresh
            session.execute(
                update(Study)
                .where(Study.id == existing.study_id)
                .values(instance_count=Study.instance_count - 1)
            )
            session.execute(
                update(Series)
                .where(Series.id == existing.series_id)
                .values(instance_count=Series.instance_count - 1)
            )
            session.delete(existing)
            session.flush()
            existing = None

    series, series_created = _lock_series(session, rec, study)
    was_receiving = study.state is StudyState.receiving
    job, reopened = _attach_to_job(session, study, now, job_max_attempts, rec.priority)
    late = not was_receiving
    if reopened and outcome is RecordOutcome.new:
        outcome = RecordOutcome.late_for_finished_study

    if existing is None:
        session.add(
            Instance(
                study_id=study.id,
                series_id=series.id,
                sop_instance_uid=rec.sop_instance_uid,
                sop_class_uid=rec.sop_class_uid,
                transfer_syntax_uid=rec.transfer_syntax_uid,
                spool_path=rec.spool_path,
                size_bytes=rec.size_bytes,
                sha256=rec.sha256,
                modality=rec.modality,
                body_part_examined=rec.body_part_examined,
                view_position=rec.view_position,
                received_at=now,
                calling_ae=rec.calling_ae,
                late=late,
                replaced_count=1 if outcome is RecordOutcome.duplicate_replaced else 0,
            )
        )
        study.instance_count += 1
        series.instance_count += 1
    else:
        if existing.series_id != series.id:
            session.execute(
                update(Series)
                .where(Series.id == existing.series_id)
                .values(instance_count=Series.instance_count - 1)
            )
            series.instance_count += 1
            existing.series_id = series.id
        existing.sop_class_uid = rec.sop_class_uid
        existing.transfer_syntax_uid = rec.transfer_syntax_uid
        existing.spool_path = rec.spool_path
        existing.size_bytes = rec.size_bytes
        existing.sha256 = rec.sha256
        existing.modality = rec.modality
        existing.body_part_examined = rec.body_part_examined
        existing.view_position = rec.view_position
        existing.received_at = now
        existing.calling_ae = rec.calling_ae
        existing.late = existing.late or late
        existing.replaced_count += 1

    if series_created:
        study.series_count += 1
    else:
        # later instances may carry attributes the first one lacked
        series.modality = series.modality or rec.modality
        series.body_part_examined = series.body_part_examined or rec.body_part_examined
        series.series_description = series.series_description or rec.series_description
    series.last_received_at = max(series.last_received_at, now)
    study.last_received_at = max(study.last_received_at, now)
    study.study_description = study.study_description or rec.study_description
    study.calling_ae = rec.calling_ae or study.calling_ae
    session.flush()
    instance_id = session.scalars(
        select(Instance.id).where(Instance.sop_instance_uid == rec.sop_instance_uid)
    ).one()
    if outcome is not RecordOutcome.new or late:
        log.info(
            "SOP instance %s of study %s: %s%s (job %s)",
            rec.sop_instance_uid,
            rec.study_uid,
            outcome.value,
            ", arrived after study completion" if late else "",
            job.id,
        )
    return RecordResult(outcome, instance_id, study.id, job.id, obsolete, late)


# --- study completion -----------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionResult:
    """A study completed by :func:`complete_quiet_studies`."""

    study_uid: str
    state: StudyState
    reason: str
    job_id: int | None
    forced: bool


def complete_quiet_studies(
    session: Session,
    *,
    quiet_seconds: float,
    max_wait_seconds: float,
    now: datetime | None = None,
    rule: ChestRule,
    limit: int = 200,
    job_max_attempts: int = 3,
) -> list[CompletionResult]:
    """Complete studies quiet for ``quiet_seconds`` (or receiving for ``max_wait_seconds``).

    A completed study that passes the chest rule gets exactly one ``queued`` job (its
    ``received`` job is queued); otherwise it is ``skipped`` with the reason and its
    ``received`` job is cancelled. Idempotent and race-free: a study is completed only from
    ``receiving``, under a row lock (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite
    ``BEGIN IMMEDIATE``), so concurrent sweeps never queue two jobs. Commits.
    """
    now = now or utcnow()
    quiet_cutoff = now - timedelta(seconds=quiet_seconds)
    forced_cutoff = now - timedelta(seconds=max_wait_seconds)

    def work() -> list[CompletionResult]:
        studies = session.scalars(
            select(Study)
            .where(
                Study.state == StudyState.receiving,
                or_(Study.last_received_at <= quiet_cutoff, Study.receiving_since <= forced_cutoff),
            )
            .order_by(Study.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        ).all()
        results = []
        for study in studies:
            forced = study.last_received_at > quiet_cutoff
            facts = [
                SeriesFacts(s.modality, s.body_part_examined, s.series_description)
                for s in session.scalars(
                    select(Series).where(Series.study_id == study.id).order_by(Series.id)
                )
            ]
            decision = evaluate_chest_rule(
                rule, study_description=study.study_description, series=facts
            )
            study.completed_at = now
            study.forced_completion = forced
            job = _active_job(session, study.id)
            job_id: int | None = None
            if decision.qualifies:
                study.state = StudyState.complete
                study.skip_reason = None
                if job is None:
                    job = _new_job(study.id, now, max_attempts=job_max_attempts)
                    session.add(job)
                    session.flush()
                if job.state is JobState.received:
                    transition(job, JobState.queued, now=now)
                job_id = job.id
            else:
                study.state = StudyState.skipped
                study.skip_reason = decision.reason
                if job is not None:
                    transition(job, JobState.cancelled, now=now)
                    job.last_error = f"study skipped: {decision.reason}"
                    job_id = job.id
            log.info(
                "study %s %s%s: %s (job %s)",
                study.study_instance_uid,
                study.state.value,
                " (forced: max wait reached)" if forced else "",
                decision.reason,
                job_id,
            )
            results.append(
                CompletionResult(
                    study.study_instance_uid, study.state, decision.reason, job_id, forced
                )
            )
        return results

    return _in_transaction(session, work)


# --- job queue ------------------------------------------------------------------------------


def claim_next_job(
    session: Session, *, owner: str, lease_seconds: float, now: datetime | None = None
) -> Job | None:
    """Claim the next queued job (highest priority, then oldest ``queued_at``) for ``owner``.

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
            )
            .order_by(Job.priority.desc(), Job.queued_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        ).first()
        if job is None:
            return None
        transition(job, JobState.running, now=now)
        job.attempts += 1
        job.lease_owner = owner
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        return job

    return _in_transaction(session, work)


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

    return _in_transaction(session, work)


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
            if job.attempts < job.max_attempts:
                transition(job, JobState.queued, now=now)
                job.last_error = (
                    f"lease of {owner} expired (attempt {job.attempts}/{job.max_attempts}); "
                    "requeued"
                )
            else:
                transition(job, JobState.failed, now=now)
                job.last_error = (
                    f"lease of {owner} expired on the last attempt "
                    f"({job.attempts}/{job.max_attempts})"
                )
            log.warning("job %s: %s", job.id, job.last_error)
        return len(jobs)

    return _in_transaction(session, work)


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
            transition(job, JobState.queued, now=now)
            job.attempts = max(0, job.attempts - 1)
            job.last_error = f"released by {owner} at shutdown"
        return len(jobs)

    return _in_transaction(session, work)


def owned_running(session: Session, job_id: int, owner: str) -> Job:
    """Lock running job ``job_id``; raise :class:`LeaseLost` unless ``owner`` holds it."""
    job = session.scalars(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    if job.state is not JobState.running or job.lease_owner != owner:
        raise LeaseLost(f"job {job_id}: {owner} does not hold its lease (state {job.state.value})")
    return job


def finish_job(
    session: Session,
    job_id: int,
    *,
    owner: str,
    sr_sop_instance_uid: str | None = None,
    selected_sop_instance_uid: str | None = None,
    now: datetime | None = None,
) -> Job:
    """Mark a running job held by ``owner`` as ``done``. Commits.

    Raises
    ------
    LeaseLost
        When ``owner`` no longer holds the job.
    """

    def work() -> Job:
        job = owned_running(session, job_id, owner)
        if sr_sop_instance_uid is not None:
            job.sr_sop_instance_uid = sr_sop_instance_uid
        if selected_sop_instance_uid is not None:
            job.selected_sop_instance_uid = selected_sop_instance_uid
        transition(job, JobState.done, now=now)
        job.last_error = None
        return job

    return _in_transaction(session, work)


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
            transition(job, JobState.queued, now=now)
            job.last_error = error
            if retry_delay is not None:
                delay = max(0.0, float(retry_delay(job.attempts)))
                job.not_before = now + timedelta(seconds=delay)
                job.last_error = (
                    f"{error} (attempt {job.attempts}/{job.max_attempts}; retry not before "
                    f"{job.not_before.isoformat(timespec='seconds')})"
                )
        else:
            transition(job, JobState.failed, now=now)
            job.last_error = error
        return job

    return _in_transaction(session, work)


def _admin_move(
    session: Session, job_id: int, to: JobState, *, actor: str, action: str, reason: str | None
) -> Job:
    def work() -> Job:
        job = session.scalars(
            select(Job)
            .where(Job.id == job_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist")
        before = job.state.value
        transition(job, to)
        if to is JobState.queued:
            job.attempts = 0
        if reason:
            job.last_error = reason
        _audit(
            session,
            actor=actor,
            action=action,
            target=f"job:{job_id}",
            detail={"from": before, "to": to.value, "reason": reason},
        )
        return job

    return _in_transaction(session, work)


def cancel_job(session: Session, job_id: int, *, actor: str, reason: str | None = None) -> Job:
    """Cancel a job (admin action, audited). Commits."""
    return _admin_move(
        session, job_id, JobState.cancelled, actor=actor, action="job.cancel", reason=reason
    )


def requeue_job(session: Session, job_id: int, *, actor: str) -> Job:
    """Queue a failed or cancelled job again with fresh attempts (admin action, audited)."""
    return _admin_move(
        session, job_id, JobState.queued, actor=actor, action="job.requeue", reason=None
    )


# --- audit ----------------------------------------------------------------------------------


def _audit(
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
    return _in_transaction(
        session, lambda: _audit(session, actor=actor, action=action, target=target, detail=detail)
    )


# --- queries --------------------------------------------------------------------------------


@dataclass
class StatusCounts:
    """Counts for ``cxr-node status`` (every state present, zero included)."""

    instances: int = 0
    studies: int = 0
    series: int = 0
    spool_bytes: int = 0
    studies_by_state: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


def counts(session: Session) -> StatusCounts:
    """Instances, series, studies (by state), jobs and deliveries by state, spool bytes.

    ``spool_bytes`` is the sum of the recorded instance sizes (the spool's content).
    """
    out = StatusCounts()
    n_inst, size = session.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
    ).one()
    out.instances = int(n_inst)
    out.spool_bytes = int(size)
    out.series = int(session.scalar(select(func.count(Series.id))) or 0)
    out.studies_by_state = {s.value: 0 for s in StudyState}
    for study_state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
        out.studies_by_state[StudyState(study_state).value] = int(n)
    out.studies = sum(out.studies_by_state.values())
    out.jobs = {s.value: 0 for s in JobState}
    for job_state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        out.jobs[JobState(job_state).value] = int(n)
    out.deliveries = {s.value: 0 for s in DeliveryState}
    for d_state, n in session.execute(
        select(Delivery.state, func.count()).group_by(Delivery.state)
    ):
        out.deliveries[DeliveryState(d_state).value] = int(n)
    return out


def purge_expired_studies(session: Session, *, older_than: datetime, limit: int = 500) -> list[str]:
    """Delete studies last received before ``older_than`` that have no active or running job.

    Their series, instances, jobs, drafts and deliveries go with them (cascade); the audit
    log stays. Commits; returns the spool paths (relative) that the caller should delete:
    the instances' files and the jobs' SRs (``outputs/<SR SOP Instance UID>.dcm``, and any
    other path a delivery row names). The SR UID derives from the Study Instance UID, which
    is unique, so no surviving study shares these SR files. Delivery rows without a job (a
    synthetic Secondary Capture sent on request) created before ``older_than`` and no
    longer pending go too, with their files.
    """

    def jobless() -> list[str]:
        # synthetic Secondary Captures sent on request: no job, no study; done with them
        done = (
            Delivery.job_id.is_(None),
            Delivery.created_at < older_than,
            Delivery.state != DeliveryState.pending,
        )
        found = list(session.scalars(select(Delivery.sr_path).where(*done)))
        session.execute(delete(Delivery).where(*done))
        return [p for p in found if p]

    def work() -> list[str]:
        sc_paths = jobless()
        busy = select(Job.study_id).where(Job.state.in_((*ACTIVE_JOB_STATES, JobState.running)))
        ids = list(
            session.scalars(
                select(Study.id)
                .where(
                    Study.last_received_at < older_than,
                    Study.state != StudyState.receiving,
                    Study.id.not_in(busy),
                )
                .order_by(Study.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            return sc_paths
        paths = list(session.scalars(select(Instance.spool_path).where(Instance.study_id.in_(ids))))
        job_ids = select(Job.id).where(Job.study_id.in_(ids))
        srs = {
            f"{OUTPUTS_DIR}/{sr_uid}.dcm"
            for sr_uid in session.scalars(
                select(Job.sr_sop_instance_uid).where(
                    Job.study_id.in_(ids), Job.sr_sop_instance_uid.is_not(None)
                )
            )
        }
        srs.update(
            session.scalars(
                select(Delivery.sr_path).where(
                    Delivery.job_id.in_(job_ids), Delivery.sr_path.is_not(None)
                )
            )
        )
        # explicit deletes, children first (no reliance on ON DELETE CASCADE being enforced)
        session.execute(delete(Draft).where(Draft.job_id.in_(job_ids)))
        session.execute(delete(Delivery).where(Delivery.job_id.in_(job_ids)))
        session.execute(delete(Job).where(Job.study_id.in_(ids)))
        session.execute(delete(Instance).where(Instance.study_id.in_(ids)))
        session.execute(delete(Series).where(Series.study_id.in_(ids)))
        session.execute(delete(Study).where(Study.id.in_(ids)))
        _audit(
            session,
            actor="system",
            action="retention.purge",
            target=None,
            detail={
                "studies": len(ids),
                "instances": len(paths),
                "srs": len(srs),
                "older_than": older_than.astimezone(UTC).isoformat(),
            },
        )
        return paths + sorted(srs) + sc_paths

    return _in_transaction(session, work)
