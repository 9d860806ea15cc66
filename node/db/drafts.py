"""Drafts: a job's study and instances for the worker, its draft report, its lease.

Drafts are kept one per (job, task): a re-run of the same job (after a lost lease or a
retry) replaces the earlier row, under the job's lease, so a job that ends ``done`` has
exactly one draft. A study drafted again (a late instance creates a new job) gets a new job
and thus its own draft. Commits per :mod:`node.db.tx`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.db.job_events import add_event
from node.db.jobs import JobNotFound, owned_running
from node.db.models import Draft, Instance, Job, JobState, Study, utcnow

__all__ = [
    "DraftRecord",
    "JobStudy",
    "StudyInstance",
    "draft_count",
    "drafts_for_job",
    "greedy_report_texts",
    "job_study",
    "lease_held",
    "save_draft",
    "study_sr_uids",
    "update_draft_timings",
    "withdrawn_sr_uids",
]


@dataclass(frozen=True)
class StudyInstance:
    """One instance of a job's study: its SOP Instance UID and spool path (relative)."""

    sop_instance_uid: str
    sop_class_uid: str
    spool_path: str
    view_position: str | None


@dataclass(frozen=True)
class JobStudy:
    """A job with its study's UID and instances (read by the pipeline's load stage)."""

    job_id: int
    study_id: int
    study_uid: str
    attempts: int
    instances: list[StudyInstance]


@dataclass(frozen=True)
class DraftRecord:
    """What the pipeline stores for a job's draft report (the text is never logged)."""

    task: str
    full_text: str
    findings: str | None
    impression: str | None
    model_name: str
    model_version: str
    demo: bool
    prompt: str | None
    generation_settings: dict[str, Any]
    timings: dict[str, Any]

    def __post_init__(self) -> None:
        if not self.task or len(self.task) > 32:
            raise ValueError(f"draft task {self.task!r} must be 1..32 characters")
        if not self.model_name or not self.model_version:
            raise ValueError("draft model_name and model_version must not be empty")


def job_study(session: Session, job_id: int) -> JobStudy:
    """The job's study UID and its instances in a stable order (series, then SOP UID).

    Raises
    ------
    JobNotFound
        When the job does not exist.
    """
    row = session.execute(
        select(Job.id, Job.study_id, Job.attempts, Study.study_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Job.id == job_id)
    ).first()
    if row is None:
        raise JobNotFound(f"job {job_id} does not exist")
    instances = [
        StudyInstance(i.sop_instance_uid, i.sop_class_uid, i.spool_path, i.view_position)
        for i in session.scalars(
            select(Instance)
            .where(Instance.study_id == row.study_id)
            .order_by(Instance.series_id, Instance.sop_instance_uid)
        )
    ]
    return JobStudy(row.id, row.study_id, row.study_instance_uid, row.attempts, instances)


def lease_held(session: Session, job_id: int, owner: str) -> bool:
    """Whether ``owner`` still holds the lease of running job ``job_id`` (read only)."""
    found = session.scalar(
        select(Job.id).where(
            Job.id == job_id, Job.state == JobState.running, Job.lease_owner == owner
        )
    )
    return found is not None


def save_draft(
    session: Session,
    job_id: int,
    *,
    owner: str,
    draft: DraftRecord,
    now: datetime | None = None,
) -> int:
    """Store the draft of a running job held by ``owner``, replacing an earlier one.

    One transaction: the job row is locked and the lease checked, drafts of the same job and
    task are deleted, the new row inserted. Commits; returns the draft id.

    Raises
    ------
    LeaseLost
        When ``owner`` no longer holds the job (the caller abandons its outputs).
    JobNotFound
        When the job does not exist.
    """
    try:
        owned_running(session, job_id, owner)
        session.execute(delete(Draft).where(Draft.job_id == job_id, Draft.task == draft.task))
        row = Draft(
            job_id=job_id,
            task=draft.task,
            findings=draft.findings,
            impression=draft.impression,
            full_text=draft.full_text,
            model_name=draft.model_name[:128],
            model_version=draft.model_version[:64],
            demo=draft.demo,
            prompt=draft.prompt,
            generation_settings=draft.generation_settings,
            timings=draft.timings,
            created_at=now or utcnow(),
        )
        session.add(row)
        session.flush()
        draft_id = int(row.id)
        add_event(
            session,
            job_id,
            "drafted",
            actor=owner,
            detail={
                "task": draft.task,
                "model": row.model_name,
                "version": row.model_version,
                "demo": draft.demo,
            },
            now=row.created_at,
        )
        session.commit()
        return draft_id
    except BaseException:
        session.rollback()
        raise


def update_draft_timings(session: Session, draft_id: int, timings: dict[str, Any]) -> None:
    """Merge ``timings`` into a draft's timings (stages measured after it was stored)."""
    try:
        row = session.get(Draft, draft_id, with_for_update=True)
        if row is not None:
            row.timings = {**(row.timings or {}), **timings}
        session.commit()
    except BaseException:
        session.rollback()
        raise


def drafts_for_job(session: Session, job_id: int, *, task: str | None = None) -> list[Draft]:
    """The drafts of a job (oldest first), optionally of one task."""
    stmt = select(Draft).where(Draft.job_id == job_id).order_by(Draft.id)
    if task is not None:
        stmt = stmt.where(Draft.task == task)
    return list(session.scalars(stmt))


def draft_count(session: Session, job_id: int) -> int:
    """How many drafts a job has."""
    return len(drafts_for_job(session, job_id))


def greedy_report_texts(
    session: Session, *, limit: int, include_demo: bool = False
) -> list[tuple[str, str, str]]:
    """The newest ``limit`` report drafts a model wrote greedily, oldest first, as
    ``(full_text, model_name, model_version)``; for replaying speculation's drafter on
    them (``cxr-node replay-drafts``). Drafts whose settings say they were sampled are left
    out; drafts without settings are kept. Demo models' drafts only with ``include_demo``.
    """
    # only the columns used: not the stored prompt and timings of each draft
    stmt = (
        select(Draft.full_text, Draft.model_name, Draft.model_version, Draft.generation_settings)
        .where(Draft.task == "report")
        .order_by(Draft.id.desc())
    )
    if not include_demo:
        stmt = stmt.where(Draft.demo.is_(False))
    out: list[tuple[str, str, str]] = []
    for text, name, version, settings in session.execute(stmt.execution_options(yield_per=256)):
        if (settings or {}).get("greedy", True) is False:
            continue
        out.append((text, name, version))
        if len(out) >= limit:
            break
    return out[::-1]


def study_sr_uids(session: Session, study_uid: str, *, before_job: int) -> list[str]:
    """SOP Instance UIDs of the draft SRs this node made for the study by jobs earlier than
    ``before_job`` (their latest), oldest first.

    What job ``before_job``'s SR supersedes (Predecessor Documents Sequence, PS3.3 C.17.2):
    a later job's draft is made from more instances, so it is newer even when it finished
    first.
    """
    return _sr_uids(session, study_uid, Job.id < before_job)


def withdrawn_sr_uids(session: Session, study_uid: str) -> set[str]:
    """SOP Instance UIDs of the study's draft SRs that were withdrawn (never issued again:
    :func:`node.runtime.draft_objects.draft_reissue`)."""
    return set(_sr_uids(session, study_uid, Job.withdrawn_at.is_not(None)))


def _sr_uids(session: Session, study_uid: str, *where: Any) -> list[str]:
    """The SR UIDs of the study's jobs that match ``where``, by job."""
    rows = session.scalars(
        select(Job.sr_sop_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Study.study_instance_uid == study_uid, Job.sr_sop_instance_uid.is_not(None), *where)
        .order_by(Job.id)
    )
    return [str(uid) for uid in rows if uid]
