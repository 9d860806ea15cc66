"""Read models for the API, the CLI and the console: job lists and detail, counts.

One shape per thing shown (:class:`JobRow`, :class:`JobDetail`, :class:`DeliverySummary`),
built from the ORM rows here and serialised by the API and the CLI as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from node.db.audit import AuditEntry, add_audit, audit_row
from node.db.job_events import JobEventRow, job_events
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
from node.db.tx import in_transaction

__all__ = [
    "DeliveryRow",
    "DraftRow",
    "JobDetail",
    "JobFilter",
    "JobRow",
    "SrVersion",
    "StatusCounts",
    "counts",
    "filter_jobs",
    "job_detail",
    "job_row",
    "metric_counts",
    "set_priority",
    "sr_chain",
]


SORT_COLUMNS: dict[str, Any] = {
    "id": Job.id,
    "created": Job.created_at,
    "updated": Job.updated_at,
    "priority": Job.priority,
    "state": Job.state,
    "study_date": Study.study_date,
    "patient_name": Study.patient_name,
    "accession": Study.accession_number,
}
"""What the job list may be sorted on (``JobFilter.sort``)."""

DELIVERY_STATES = ("none", "pending", "sent", "failed")
"""A job's delivery state as shown beside its job state (see :func:`delivery_state`)."""


@dataclass(frozen=True, kw_only=True)
class JobFilter:
    """Filters of the job list; every given criterion must hold (AND).

    ``since``/``until`` bound ``created_at`` (``since`` inclusive, ``until`` exclusive);
    ``destination`` matches jobs with a delivery to that destination (its text form).
    ``text`` matches, case-insensitively and in part, the patient's name or ID, the
    accession number, the study description or the Study Instance UID; each word must
    match (``"doe jane"`` finds ``DOE^JANE``). ``patient``, ``accession``, ``calling_ae``
    match their field in part; ``modality`` is one of the study's modalities;
    ``study_date_from``/``study_date_to`` bound Study Date (YYYYMMDD, inclusive).
    ``delivery`` is a :data:`DELIVERY_STATES` value. ``sort`` is a :data:`SORT_COLUMNS`
    key, ``descending`` its direction (ties broken by job id).
    """

    states: Sequence[JobState] = ()
    since: datetime | None = None
    until: datetime | None = None
    study_uid: str | None = None
    destination: str | None = None
    text: str | None = None
    patient: str | None = None
    accession: str | None = None
    modality: str | None = None
    calling_ae: str | None = None
    study_date_from: str | None = None
    study_date_to: str | None = None
    delivery: str | None = None
    sort: str = "id"
    descending: bool = True
    limit: int = 100
    offset: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= 1000:
            raise ValueError(f"limit must be within 1..1000, got {self.limit}")
        if self.offset < 0:
            raise ValueError(f"offset must not be negative, got {self.offset}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")
        for name in ("study_date_from", "study_date_to"):
            value = getattr(self, name)
            if value is not None and not (len(value) == 8 and value.isdigit()):
                raise ValueError(f"{name} must be a date as YYYYMMDD, got {value!r}")
        if self.sort not in SORT_COLUMNS:
            raise ValueError(f"sort must be one of {', '.join(SORT_COLUMNS)}, got {self.sort!r}")
        if self.delivery is not None and self.delivery not in DELIVERY_STATES:
            raise ValueError(
                f"delivery must be one of {', '.join(DELIVERY_STATES)}, got {self.delivery!r}"
            )


@dataclass(frozen=True)
class JobRow:
    """A job in a list, with its study's identity (patient data: pages and API only, never
    logged) and its delivery state beside its job state."""

    id: int
    study_uid: str
    state: str
    priority: int
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    sr_uid: str | None
    lease_owner: str | None
    last_error: str | None
    withdrawn_at: datetime | None = None
    withdrawn_by: str | None = None
    withdrawn_reason: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    modalities: str | None = None
    calling_ae: str | None = None
    delivery_state: str = "none"
    deliveries_failed: int = 0
    rule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (datetimes as ISO 8601); ``cxr-node jobs list --json``."""
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}


def delivery_state(states: Sequence[DeliveryState]) -> str:
    """A job's delivery state from its deliveries' states.

    ``failed`` when any delivery failed for good, else ``pending`` when any is still to be
    sent, else ``sent`` when there are deliveries, else ``none``.
    """
    if not states:
        return "none"
    if DeliveryState.failed in states:
        return "failed"
    if any(s is not DeliveryState.sent for s in states):
        return "pending"
    return "sent"


def job_row(job: Job, study: Study, deliveries: Sequence[DeliveryState] = ()) -> JobRow:
    return JobRow(
        id=job.id,
        study_uid=study.study_instance_uid,
        state=job.state.value,
        priority=job.priority,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        created_at=job.created_at,
        updated_at=job.updated_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        sr_uid=job.sr_sop_instance_uid,
        lease_owner=job.lease_owner,
        last_error=job.last_error,
        withdrawn_at=job.withdrawn_at,
        withdrawn_by=job.withdrawn_by,
        withdrawn_reason=job.withdrawn_reason,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        study_date=study.study_date,
        study_description=study.study_description,
        modalities=study.modalities,
        calling_ae=study.calling_ae,
        delivery_state=delivery_state(deliveries),
        deliveries_failed=sum(1 for s in deliveries if s is DeliveryState.failed),
        rule=job.rule,
    )


def _like(text: str) -> str:
    """A case-insensitive LIKE pattern matching ``text`` anywhere (``\\`` escapes)."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _contains(column: Any, text: str) -> Any:
    return func.lower(column).like(_like(text), escape="\\")


def _conditions(flt: JobFilter) -> list[Any]:
    conds: list[Any] = []
    if flt.states:
        conds.append(Job.state.in_([JobState(s) for s in flt.states]))
    if flt.since is not None:
        conds.append(Job.created_at >= flt.since)
    if flt.until is not None:
        conds.append(Job.created_at < flt.until)
    if flt.study_uid:
        conds.append(Study.study_instance_uid == flt.study_uid)
    if flt.destination:
        conds.append(
            Job.id.in_(select(Delivery.job_id).where(Delivery.destination == flt.destination))
        )
    for word in (flt.text or "").replace("^", " ").split():
        conds.append(
            or_(
                _contains(Study.patient_name, word),
                _contains(Study.patient_id, word),
                _contains(Study.accession_number, word),
                _contains(Study.study_description, word),
                _contains(Study.study_instance_uid, word),
            )
        )
    for word in (flt.patient or "").replace("^", " ").split():
        conds.append(or_(_contains(Study.patient_name, word), _contains(Study.patient_id, word)))
    if flt.accession:
        conds.append(_contains(Study.accession_number, flt.accession))
    if flt.calling_ae:
        conds.append(_contains(Study.calling_ae, flt.calling_ae))
    if flt.modality:
        conds.append(_contains(Study.modalities, flt.modality))
    if flt.study_date_from:
        conds.append(Study.study_date >= flt.study_date_from)
    if flt.study_date_to:
        conds.append(Study.study_date <= flt.study_date_to)
    if flt.delivery is not None:
        conds.append(_delivery_condition(flt.delivery))
    return conds


def _delivery_condition(state: str) -> Any:
    has = select(Delivery.job_id).where(Delivery.job_id == Job.id)
    failed = has.where(Delivery.state == DeliveryState.failed)
    open_ = has.where(Delivery.state == DeliveryState.pending)
    if state == "none":
        return ~has.exists()
    if state == "failed":
        return failed.exists()
    if state == "pending":
        return and_(~failed.exists(), open_.exists())
    return and_(has.exists(), ~failed.exists(), ~open_.exists())


def filter_jobs(session: Session, flt: JobFilter) -> tuple[list[JobRow], int]:
    """Jobs matching ``flt`` in its order (default newest first), and the number of matches."""
    conds = _conditions(flt)
    base = select(Job, Study).join(Study, Study.id == Job.study_id)
    count_stmt = select(func.count(Job.id)).join(Study, Study.id == Job.study_id)
    if conds:
        base = base.where(*conds)
        count_stmt = count_stmt.where(*conds)
    total = int(session.scalar(count_stmt) or 0)
    column = SORT_COLUMNS[flt.sort]
    order = [column.desc(), Job.id.desc()] if flt.descending else [column.asc(), Job.id.asc()]
    rows = session.execute(base.order_by(*order).limit(flt.limit).offset(flt.offset)).all()
    states: dict[int, list[DeliveryState]] = {}
    ids = [job.id for job, _study in rows]
    if ids:
        for job_id, d_state in session.execute(
            select(Delivery.job_id, Delivery.state).where(Delivery.job_id.in_(ids))
        ):
            if job_id is not None:
                states.setdefault(int(job_id), []).append(DeliveryState(d_state))
    return [job_row(job, study, states.get(job.id, ())) for job, study in rows], total


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
        DraftRow(
            d.id,
            d.task,
            d.full_text,
            d.findings,
            d.impression,
            d.model_name,
            d.model_version,
            d.demo,
            d.timings,
            d.generation_settings,
            d.created_at,
        )
        for d in session.scalars(
            select(Draft).where(Draft.job_id == job_id).order_by(Draft.id.desc())
        )
    ]
    delivery_rows = list(
        session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id))
    )
    deliveries = [
        DeliveryRow(
            d.id,
            d.destination,
            d.kind.value,
            d.object.value,
            d.object_uid,
            d.state.value,
            d.attempts,
            d.next_attempt_at,
            d.last_attempt_at,
            d.sent_at,
            d.last_error,
            d.created_at,
        )
        for d in delivery_rows
    ]
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
    jobs = {s.value: 0 for s in JobState}
    for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        jobs[JobState(state).value] = int(n)
    deliveries = {s.value: 0 for s in DeliveryState}
    for d_state, n in session.execute(
        select(Delivery.state, func.count()).group_by(Delivery.state)
    ):
        deliveries[DeliveryState(d_state).value] = int(n)
    return jobs, deliveries


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
