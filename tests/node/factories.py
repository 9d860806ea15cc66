"""Builders of test records (synthetic UIDs, no patient data)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from itertools import count
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from node.db.instance_record import InstanceRecord
from node.db.models import Draft, Job, JobState, Study, StudyState

_n = count(1)
ROOT = "1.2.826.0.1.3680043.10.1234"


def uid() -> str:
    """A fresh synthetic UID."""
    return f"{ROOT}.{next(_n)}"


T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def record(
    *,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    study_description: str | None = None,
    series_description: str | None = None,
    content: bytes = b"pixels",
    at: datetime = T0,
    spool_path: str | None = None,
    **fields: Any,
) -> InstanceRecord:
    """An :class:`InstanceRecord` with sensible defaults (a chest CR).

    ``fields`` are further :class:`InstanceRecord` fields (e.g. ``view_position``,
    ``sop_class_uid``); they win over the defaults.
    """
    sop = sop or uid()
    series = series or f"{study}.1"
    values: dict[str, Any] = {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "view_position": "PA",
        **fields,
    }
    return InstanceRecord(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        modality=modality,
        body_part_examined=body_part,
        study_description=study_description,
        series_description=series_description,
        spool_path=spool_path or f"{study}/{series}/{sop}.dcm",
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        calling_ae="PACS",
        received_at=at,
        **values,
    )


def add_done_job(
    session: Session,
    study_uid: str,
    *,
    at: datetime,
    accession: str | None = None,
    **job_fields: Any,
) -> Job:
    """A complete study and its ``done`` job, added and flushed (not committed).

    Parameters
    ----------
    session
        Where to add them.
    study_uid
        The study's Study Instance UID.
    at
        Every time stamp of the study and the job.
    accession
        The study's accession number.
    **job_fields
        Further :class:`Job` columns (e.g. ``sr_sop_instance_uid``).

    Returns
    -------
    Job
        The job, with its id.
    """
    study = Study(
        study_instance_uid=study_uid,
        state=StudyState.complete,
        accession_number=accession,
        first_received_at=at,
        last_received_at=at,
        receiving_since=at,
        completed_at=at,
    )
    session.add(study)
    session.flush()
    return _done_job(session, study.id, at=at, **job_fields)


def _done_job(session: Session, study_id: int, *, at: datetime, **job_fields: Any) -> Job:
    job = Job(
        study_id=study_id,
        state=JobState.done,
        created_at=at,
        updated_at=at,
        finished_at=at,
        **job_fields,
    )
    session.add(job)
    session.flush()
    return job


def _report_draft(job_id: int, text: str, *, at: datetime, version: str = "v1") -> Draft:
    return Draft(
        job_id=job_id,
        task="report",
        full_text=text,
        impression=text,
        model_name="LLM-CXR-DEMO",
        model_version=version,
        created_at=at,
    )


def add_redraft(
    session: Session, job_id: int, text: str, *, at: datetime, sr_sop_instance_uid: str
) -> Job:
    """A later ``done`` job of job ``job_id``'s study with the report draft ``text``, as when
    a late instance has the study drafted again; added and flushed (not committed).

    Returns
    -------
    Job
        The new job, with its id.
    """
    study_id = session.get_one(Job, job_id).study_id
    job = _done_job(session, study_id, at=at, sr_sop_instance_uid=sr_sop_instance_uid)
    session.add(_report_draft(job.id, text, at=at))
    session.flush()
    return job


def seed_draft(
    factory: sessionmaker[Session],
    study_uid: str,
    text: str,
    *,
    accession: str | None = None,
    version: str = "v1",
    at: datetime = T0,
) -> int:
    """A study whose job is done with a report draft (rows, as the worker leaves them)."""
    with factory() as s:
        job = add_done_job(
            s, study_uid, at=at, accession=accession, sr_sop_instance_uid=f"{study_uid}.9"
        )
        s.add(_report_draft(job.id, text, at=at, version=version))
        s.commit()
        return int(job.id)
