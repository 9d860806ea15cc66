"""Studies as they arrive: instance bookkeeping at ingest.

:func:`record_instance_detailed` records a spooled instance, its series, study and job in
one committed transaction before the C-STORE response (PS3.4 B.2.3). What recording takes
and gives is in :mod:`node.db.instance_record`; completing a study after its quiet period is
:mod:`node.db.study_completion`. Commits per :mod:`node.db.tx`.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from node.db.instance_record import InstanceRecord, RecordOutcome, RecordResult
from node.db.job_events import add_event
from node.db.jobs import active_job, new_job
from node.db.models import Instance, Job, Series, Study, StudyState
from node.db.tx import in_transaction, insert_for

__all__ = ["record_instance", "record_instance_detailed"]

log = logging.getLogger(__name__)


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


_Row = TypeVar("_Row", Study, Series)


def _locked(
    session: Session, model: type[_Row], column: InstrumentedAttribute[str], value: str
) -> _Row | None:
    """The row of ``model`` whose unique ``column`` is ``value``, locked and reloaded;
    ``None`` when there is none."""
    return session.scalars(
        select(model)
        .where(column == value)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()


def _must(row: _Row | None) -> _Row:
    if row is None:  # inserted (or found) just before, in this transaction
        raise RuntimeError("a row inserted in this transaction is not there")
    return row


def _lock_study(session: Session, rec: InstanceRecord) -> Study:
    """Insert the study if it is new (``receiving``); return its row, locked.

    The row is looked up first: most instances belong to a study already recorded, and the
    insert is then one statement fewer (a concurrent insert of the same study is settled by
    the unique index: ``ON CONFLICT DO NOTHING``, then the lookup again).
    """
    found = _locked(session, Study, Study.study_instance_uid, rec.study_uid)
    if found is not None:
        return found
    now = rec.received_at
    stmt = (
        insert_for(session)(Study)
        .values(
            study_instance_uid=rec.study_uid,
            state=StudyState.receiving.value,
            study_description=rec.study_description,
            accession_number=rec.accession_number,
            patient_name=rec.patient_name,
            patient_id=rec.patient_id,
            study_date=rec.study_date,
            modalities=_add_modality(None, rec.modality),
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
    return _must(_locked(session, Study, Study.study_instance_uid, rec.study_uid))


def _lock_series(session: Session, rec: InstanceRecord, study: Study) -> tuple[Series, bool]:
    """Insert the series if it is new; return its row, locked, and whether it was new
    (looked up first, as :func:`_lock_study`)."""
    found = _locked(session, Series, Series.series_instance_uid, rec.series_uid)
    if found is not None:
        return found, False
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
    return _must(_locked(session, Series, Series.series_instance_uid, rec.series_uid)), created


def _attach_to_job(
    session: Session, study: Study, now: datetime, job_max_attempts: int, priority: int
) -> tuple[Job, bool]:
    """Return the study's active job, reopening a finished study if there is none.

    A new job gets ``priority``; an active one is raised to it when it is higher (a STAT
    instance of a routine study), never lowered.
    """
    job = active_job(session, study.id)
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
        add_event(session, job.id, "received", actor=study.calling_ae, now=now)
    elif priority > job.priority:
        log.info("job %s: priority raised from %d to %d", job.id, job.priority, priority)
        job.priority = priority
        job.updated_at = now
    return job, reopened


def _record(session: Session, rec: InstanceRecord, job_max_attempts: int) -> RecordResult:
    """The body of :func:`record_instance_detailed`, inside its transaction."""
    study = _lock_study(session, rec)
    existing = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid).with_for_update()
    ).first()
    if (
        existing is not None
        and existing.sha256 == rec.sha256
        and existing.size_bytes == (rec.size_bytes)
    ):
        return _identical_duplicate(session, rec, existing)

    outcome = RecordOutcome.new
    obsolete = None
    if existing is not None:
        outcome = RecordOutcome.duplicate_replaced
        if existing.spool_path != rec.spool_path:
            obsolete = existing.spool_path
        if existing.study_id != study.id:
            _forget_moved_instance(session, existing)
            existing = None

    series, series_created = _lock_series(session, rec, study)
    was_receiving = study.state is StudyState.receiving
    job, reopened = _attach_to_job(session, study, rec.received_at, job_max_attempts, rec.priority)
    late = not was_receiving
    if reopened and outcome is RecordOutcome.new:
        outcome = RecordOutcome.late_for_finished_study

    if existing is None:
        replaced = outcome is RecordOutcome.duplicate_replaced
        row = _add_instance(session, rec, study, series, late=late, replaced=replaced)
    else:
        _replace_instance(session, rec, existing, series, late=late)
        row = existing
    _update_study_and_series(rec, study, series, series_created=series_created)
    session.flush()
    instance_id = int(row.id)
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


def _identical_duplicate(session: Session, rec: InstanceRecord, existing: Instance) -> RecordResult:
    """An instance already recorded with the same content: nothing changes.

    The just-spooled file is obsolete when it lies elsewhere than the recorded one.
    """
    obsolete = rec.spool_path if rec.spool_path != existing.spool_path else None
    active = active_job(session, existing.study_id)
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


def _uncount(session: Session, model: type[Study] | type[Series], row_id: int) -> None:
    """Take one instance off the ``instance_count`` of a study or series row, in SQL."""
    session.execute(
        update(model).where(model.id == row_id).values(instance_count=model.instance_count - 1)
    )


def _forget_moved_instance(session: Session, existing: Instance) -> None:
    """An instance that moved to another study: delete its row (it is recorded afresh)."""
    _uncount(session, Study, existing.study_id)
    _uncount(session, Series, existing.series_id)
    session.delete(existing)
    session.flush()


#: the columns of an instance's row that describe its received file (written when it is
#: added and again when a newer copy replaces it)
_RECEIVED_FILE = (
    "sop_class_uid",
    "transfer_syntax_uid",
    "spool_path",
    "size_bytes",
    "sha256",
    "modality",
    "body_part_examined",
    "view_position",
    "received_at",
    "calling_ae",
    "association_id",
)


def _add_instance(
    session: Session,
    rec: InstanceRecord,
    study: Study,
    series: Series,
    *,
    late: bool,
    replaced: bool,
) -> Instance:
    """Add the instance's row and count it in its study and series; return the row."""
    row = Instance(
        study_id=study.id,
        series_id=series.id,
        sop_instance_uid=rec.sop_instance_uid,
        late=late,
        replaced_count=1 if replaced else 0,
        **{name: getattr(rec, name) for name in _RECEIVED_FILE},
    )
    session.add(row)
    study.instance_count += 1
    series.instance_count += 1
    return row


def _replace_instance(
    session: Session, rec: InstanceRecord, existing: Instance, series: Series, *, late: bool
) -> None:
    """Point an instance's row at its newly received file ("newest wins"), maybe in a new
    series of the same study."""
    if existing.series_id != series.id:
        _uncount(session, Series, existing.series_id)
        series.instance_count += 1
        existing.series_id = series.id
    for name in _RECEIVED_FILE:
        setattr(existing, name, getattr(rec, name))
    existing.late = existing.late or late
    existing.replaced_count += 1


def _update_study_and_series(
    rec: InstanceRecord, study: Study, series: Series, *, series_created: bool
) -> None:
    """Count a new series; fill attributes the first instances lacked; advance the times."""
    now = rec.received_at
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
    study.accession_number = study.accession_number or rec.accession_number
    study.patient_name = study.patient_name or rec.patient_name
    study.patient_id = study.patient_id or rec.patient_id
    study.study_date = study.study_date or rec.study_date
    study.modalities = _add_modality(study.modalities, rec.modality)
    study.calling_ae = rec.calling_ae or study.calling_ae


def _add_modality(modalities: str | None, modality: str | None) -> str | None:
    """``modalities`` (as Modalities in Study (0008,0061): values joined by ``\\``) with
    ``modality`` added once; at most 64 characters."""
    have = [m for m in (modalities or "").split("\\") if m]
    if modality and modality.upper() not in have:
        joined = "\\".join([*have, modality.upper()])
        if len(joined) <= 64:
            return joined
    return modalities
