"""Read models for the API, the CLI and the console: job detail, counts; the job list
(:mod:`node.db.job_list`) is re-exported here.

One shape per thing shown (:class:`JobRow`, :class:`JobDetail`, :class:`DeliveryRow`),
built from the ORM rows here and serialised by the API and the CLI as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.audit import AuditEntry, add_audit, audit_row
from node.db.job_events import JobEventRow, job_events
from node.db.job_list import (
    DELIVERY_STATES,
    SORT_COLUMNS,
    JobFilter,
    JobRow,
    delivery_state,
    filter_jobs,
    job_row,
)
from node.db.jobs import JobNotFound
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
from node.db.queries import count_by_state
from node.db.read_models import read_model
from node.db.tx import in_transaction

__all__ = [
    "DELIVERY_STATES",
    "SORT_COLUMNS",
    "DeliveryRow",
    "DraftRow",
    "JobDetail",
    "JobFilter",
    "JobRow",
    "SrVersion",
    "StatusCounts",
    "counts",
    "delivery_row",
    "delivery_state",
    "filter_jobs",
    "job_detail",
    "job_row",
    "metric_counts",
    "set_priority",
    "sr_chain",
]


@dataclass(frozen=True)
class DraftRow:
    """A draft of a job (report text included: API only, never logged)."""

    id: int
    task: str
    text: str
    findings: str | None
    impression: str | None
    model_name: str
    model_version: str
    demo: bool
    timings: dict[str, Any] | None
    generation_settings: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class DeliveryRow:
    """Delivery of one of a job's objects to one destination."""

    id: int
    job_id: int | None
    destination: str
    kind: str
    object: str
    object_uid: str | None
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    sent_at: datetime | None
    last_error: str | None
    created_at: datetime


def delivery_row(d: Delivery) -> DeliveryRow:
    """The read model of a delivery row; ``next_attempt_at`` only while it is ``pending``
    (a cancelled row's is the end of a claim it may still be sent under, not an attempt
    to come: :meth:`Delivery.cancel`)."""
    due = d.next_attempt_at if d.state is DeliveryState.pending else None
    return read_model(DeliveryRow, d, next_attempt_at=due)


@dataclass(frozen=True)
class JobDetail:
    """A job with its study, drafts (newest first), deliveries, audit trail, the study's
    chain of draft SRs (oldest first) and the job's history (oldest first)."""

    job: JobRow
    selected_sop_instance_uid: str | None
    lease_expires_at: datetime | None
    drafts: list[DraftRow] = field(default_factory=list)
    deliveries: list[DeliveryRow] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    sr_chain: list[SrVersion] = field(default_factory=list)
    events: list[JobEventRow] = field(default_factory=list)


@dataclass(frozen=True)
class SrVersion:
    """One draft SR of a study: each later one supersedes the earlier ones (its Predecessor
    Documents Sequence, PS3.3 C.17.2, names them)."""

    job_id: int
    sr_uid: str
    finished_at: datetime | None
    withdrawn_at: datetime | None
    superseded: bool


def sr_chain(session: Session, study_uid: str) -> list[SrVersion]:
    """The study's draft SRs from this node, oldest first; all but the newest superseded."""
    rows = list(
        session.execute(
            select(Job.id, Job.sr_sop_instance_uid, Job.finished_at, Job.withdrawn_at)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_instance_uid == study_uid, Job.sr_sop_instance_uid.is_not(None))
            .order_by(Job.id)
        )
    )
    last = len(rows) - 1
    return [
        SrVersion(int(job_id), str(uid), finished, withdrawn, k < last)
        for k, (job_id, uid, finished, withdrawn) in enumerate(rows)
    ]


def job_detail(session: Session, job_id: int) -> JobDetail:
    """Everything known about one job.

    Raises
    ------
    JobNotFound
        When no job has that id.
    """
    found = session.execute(
        select(Job, Study).join(Study, Study.id == Job.study_id).where(Job.id == job_id)
    ).first()
    if found is None:
        raise JobNotFound(f"job {job_id} does not exist")
    job, study = found
    uid = study.study_instance_uid
    drafts = [
        read_model(DraftRow, d, text=d.full_text)
        for d in session.scalars(
            select(Draft).where(Draft.job_id == job_id).order_by(Draft.id.desc())
        )
    ]
    delivery_rows = list(
        session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id))
    )
    deliveries = [delivery_row(d) for d in delivery_rows]
    audit = [
        audit_row(a)
        for a in session.scalars(
            select(AuditLog).where(AuditLog.target == f"job:{job_id}").order_by(AuditLog.id)
        )
    ]
    return JobDetail(
        job=job_row(job, study, [d.state for d in delivery_rows]),
        selected_sop_instance_uid=job.selected_sop_instance_uid,
        lease_expires_at=job.lease_expires_at,
        drafts=drafts,
        deliveries=deliveries,
        audit=audit,
        sr_chain=sr_chain(session, uid),
        events=job_events(session, job_id),
    )


def set_priority(session: Session, job_id: int, priority: int, *, actor: str) -> JobRow:
    """Change a job's priority (higher is claimed first); audit ``job.priority``. Commits.

    Raises
    ------
    JobNotFound
        When no job has that id.
    """

    def work() -> JobRow:
        found = session.execute(
            select(Job, Study)
            .join(Study, Study.id == Job.study_id)
            .where(Job.id == job_id)
            .with_for_update(of=Job)
            .execution_options(populate_existing=True)
        ).first()
        if found is None:
            raise JobNotFound(f"job {job_id} does not exist")
        job, study = found
        before = job.priority
        job.priority = priority
        job.updated_at = utcnow()
        add_audit(
            session,
            actor=actor,
            action="job.priority",
            target=f"job:{job_id}",
            detail={"from": before, "to": priority},
        )
        states = session.scalars(select(Delivery.state).where(Delivery.job_id == job_id))
        return job_row(job, study, list(states))

    return in_transaction(session, work)


def metric_counts(session: Session) -> tuple[dict[str, int], dict[str, int]]:
    """Jobs by state and deliveries by state (every state present, zeros included)."""
    return (
        count_by_state(session, Job.state, JobState),
        count_by_state(session, Delivery.state, DeliveryState),
    )


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
    out.studies_by_state = count_by_state(session, Study.state, StudyState)
    out.studies = sum(out.studies_by_state.values())
    out.jobs, out.deliveries = metric_counts(session)
    return out
