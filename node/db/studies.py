"""Studies as they arrive: instance bookkeeping at ingest, completion, what is stored.

:func:`record_instance_detailed` records a spooled instance, its series, study and job in
one committed transaction before the C-STORE response; :func:`complete_quiet_studies`
closes studies after their quiet period and queues (or skips) their jobs by the chest rule.
Commits per :mod:`node.db.tx`.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from node.db.jobs import ACTIVE_JOB_STATES, new_job, transition
from node.db.models import Instance, Job, JobState, Series, Study, StudyState, utcnow
from node.db.tx import in_transaction, insert_for
from node.runtime.assembly import SeriesFacts, evaluate_chest_rule
from node.settings import ChestRule

__all__ = [
    "CompletionResult",
    "InstanceRecord",
    "RecordOutcome",
    "RecordResult",
    "StudyChoice",
    "StudyImages",
    "StudyNotFound",
    "complete_quiet_studies",
    "recent_studies",
    "record_instance",
    "record_instance_detailed",
    "study_instances",
]

log = logging.getLogger(__name__)

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
    return in_transaction(session, lambda: _record(session, rec, job_max_attempts))


def _lock_study(session: Session, rec: InstanceRecord) -> Study:
    now = rec.received_at
    stmt = (
        insert_for(session)(Study)
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
        insert_for(session)(Series)
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
        job = new_job(study.id, now, max_attempts=job_max_attempts, priority=priority)
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
                    job = new_job(study.id, now, max_attempts=job_max_attempts)
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

    return in_transaction(session, work)


class StudyNotFound(LookupError):
    """No study with that Study Instance UID (0020,000D) on this node (HTTP 404)."""

    http_status = 404


@dataclass(frozen=True)
class StudyImages:
    """A study's instances (spool paths relative) and the image its newest job selected."""

    study_uid: str
    instances: list[tuple[str, str]]  # (SOP Instance UID, spool path)
    selected_sop_instance_uid: str | None


def study_instances(session: Session, study_uid: str) -> StudyImages:
    """The instances of a study and the newest selected image of its jobs.

    Raises
    ------
    StudyNotFound
        When the node holds no study with that UID.
    """
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise StudyNotFound(f"no study with Study Instance UID (0020,000D) {study_uid}")
    inst = [
        (uid, path)
        for uid, path in session.execute(
            select(Instance.sop_instance_uid, Instance.spool_path)
            .where(Instance.study_id == study.id)
            .order_by(Instance.id)
        ).all()
    ]
    selected = session.scalar(
        select(Job.selected_sop_instance_uid)
        .where(Job.study_id == study.id, Job.selected_sop_instance_uid.is_not(None))
        .order_by(Job.id.desc())
        .limit(1)
    )
    return StudyImages(study_uid, inst, selected)


@dataclass(frozen=True)
class StudyChoice:
    """A stored study offered on the Try page (UIDs and counts only, no patient data)."""

    study_uid: str
    instance_count: int
    last_received_at: datetime


def recent_studies(session: Session, *, limit: int = 50) -> list[StudyChoice]:
    """The newest stored studies that still have at least one instance in the spool."""
    has_inst = select(Instance.study_id).distinct()
    rows = session.execute(
        select(Study.study_instance_uid, Study.instance_count, Study.last_received_at)
        .where(Study.id.in_(has_inst))
        .order_by(Study.last_received_at.desc())
        .limit(limit)
    ).all()
    return [StudyChoice(uid, int(n or 0), at) for uid, n, at in rows]
