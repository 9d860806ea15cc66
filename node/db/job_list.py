"""The job list: one row per job with its study's identity and its delivery state, and the
queue's search, filters, sorting and paging (:class:`JobFilter`, :func:`filter_jobs`).

Patient data (name, ID) in the rows is for the console and the API only, never logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, and_, literal, or_, select
from sqlalchemy.orm import Session

from node.db.models import Delivery, DeliveryState, Job, JobState, Study
from node.db.queries import check_page, contains, page
from node.db.read_models import read_model
from node.jsonable import to_jsonable

__all__ = [
    "DELIVERY_STATES",
    "SORT_COLUMNS",
    "JobFilter",
    "JobRow",
    "delivery_state",
    "filter_jobs",
    "job_row",
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
        check_page(self.limit, self.offset)
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
        return dict(to_jsonable(self))


def delivery_state(states: Sequence[DeliveryState]) -> str:
    """A job's delivery state from its deliveries' states.

    ``failed`` when any delivery failed for good, else ``pending`` when any is still to be
    sent, else ``sent`` when any was sent, else ``none``. A delivery ``cancelled`` (the
    draft withdrawn or superseded first) was not sent and will not be: it does not count.
    :func:`filter_jobs`'s ``delivery`` filter applies the same rule in SQL.
    """
    if DeliveryState.failed in states:
        return "failed"
    if DeliveryState.pending in states:
        return "pending"
    if DeliveryState.sent in states:
        return "sent"
    return "none"


#: the fields of :class:`JobRow` that are the study's (the others are the job's)
_STUDY_FIELDS = (
    "patient_name",
    "patient_id",
    "accession_number",
    "study_date",
    "study_description",
    "modalities",
    "calling_ae",
)


def job_row(job: Job, study: Study, deliveries: Sequence[DeliveryState] = ()) -> JobRow:
    """The list row of ``job``: its own columns, its study's identity, its deliveries'
    summary state."""
    return read_model(
        JobRow,
        job,
        study_uid=study.study_instance_uid,
        sr_uid=job.sr_sop_instance_uid,
        delivery_state=delivery_state(deliveries),
        deliveries_failed=sum(1 for s in deliveries if s is DeliveryState.failed),
        **{name: getattr(study, name) for name in _STUDY_FIELDS},
    )


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
                contains(Study.patient_name, word),
                contains(Study.patient_id, word),
                contains(Study.accession_number, word),
                contains(Study.study_description, word),
                contains(Study.study_instance_uid, word),
            )
        )
    for word in (flt.patient or "").replace("^", " ").split():
        conds.append(or_(contains(Study.patient_name, word), contains(Study.patient_id, word)))
    if flt.accession:
        conds.append(contains(Study.accession_number, flt.accession))
    if flt.calling_ae:
        conds.append(contains(Study.calling_ae, flt.calling_ae))
    if flt.modality:
        conds.append(_has_modality(flt.modality))
    if flt.study_date_from:
        conds.append(Study.study_date >= flt.study_date_from)
    if flt.study_date_to:
        conds.append(Study.study_date <= flt.study_date_to)
    if flt.delivery is not None:
        conds.append(_delivery_condition(flt.delivery))
    return conds


def _has_modality(modality: str) -> Any:
    """The study's modalities (values joined by ``\\``, as Modalities in Study) hold
    ``modality`` as one of them, in any case: ``CT`` is not found in ``OCT``."""
    sep = literal("\\", String)
    return contains(sep + Study.modalities + sep, f"\\{modality.strip()}\\")


def _delivery_condition(state: str) -> Any:
    """SQL of :func:`delivery_state` = ``state``: ``cancelled`` rows do not count."""
    has = select(Delivery.job_id).where(
        Delivery.job_id == Job.id, Delivery.state != DeliveryState.cancelled
    )
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
    stmt = select(Job, Study).join(Study, Study.id == Job.study_id).where(*_conditions(flt))
    column = SORT_COLUMNS[flt.sort]
    order = [column.desc(), Job.id.desc()] if flt.descending else [column.asc(), Job.id.asc()]
    result, total = page(session, stmt, order_by=order, limit=flt.limit, offset=flt.offset)
    rows = result.all()
    states: dict[int, list[DeliveryState]] = {}
    ids = [job.id for job, _study in rows]
    if ids:
        for job_id, d_state in session.execute(
            select(Delivery.job_id, Delivery.state).where(Delivery.job_id.in_(ids))
        ):
            if job_id is not None:
                states.setdefault(int(job_id), []).append(DeliveryState(d_state))
    return [job_row(job, study, states.get(job.id, ())) for job, study in rows], total
