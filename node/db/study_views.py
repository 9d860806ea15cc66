"""Read views of studies: a study's stored instances (for the model's tasks on demand) and
the most recently received studies (for choosing one)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Instance, Job, Study

__all__ = ["StudyChoice", "StudyImages", "StudyNotFound", "recent_studies", "study_instances"]


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
