"""Final reports: store what the radiologist signed, match it to the draft, keep the scores.

A final report is stored once per (source, object UID): a PACS or RIS that sends it again
gets the same row (idempotent). It is matched to the newest ``report`` draft of its study,
found by Study Instance UID (0020,000D) or else by Accession Number (0008,0050); a final
that arrives before the draft waits unmatched until :func:`unmatched_finals` finds it a
draft. Each change is one transaction (:mod:`node.db.tx`) with its audit row; report text
goes in no audit row and no log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from node.db.audit import add_audit
from node.db.jobs import JobNotFound
from node.db.models import Draft, FinalReport, FinalSource, Job, JobState, Study, utcnow
from node.db.tx import in_transaction

__all__ = [
    "DraftMatch",
    "FinalIn",
    "FinalRow",
    "PairScores",
    "draft_for",
    "draft_of_job",
    "final_counts",
    "finals_for_job",
    "pair_rows",
    "record_final",
    "record_review",
    "rolling_agreement",
    "save_scores",
    "unmatched_finals",
]


@dataclass(frozen=True, kw_only=True)
class FinalIn:
    """A final report as received (see :class:`integration.final_report.FinalReport`)."""

    source: FinalSource
    object_uid: str
    sender: str | None
    study_uid: str | None
    accession_number: str | None
    verified: bool
    full_text: str
    findings: str | None
    impression: str | None
    signed_at: datetime | None
    review_decision: str | None = None
    review_reason: str | None = None
    job_id: int | None = None
    """Set for a review at the node (its job is known); else found by matching."""


@dataclass(frozen=True)
class DraftMatch:
    """The draft a final report is compared with."""

    job_id: int
    draft_id: int
    study_uid: str
    text: str
    model_name: str
    model_version: str
    drafted_at: datetime


@dataclass(frozen=True)
class PairScores:
    """The concordance of one draft/final pair, as stored (labels as plain strings)."""

    draft_labels: dict[str, str]
    final_labels: dict[str, str]
    agreement: float
    discrepancies: list[dict[str, str]]
    bleu4: float | None
    rouge_l: float | None
    turnaround_s: float | None


@dataclass(frozen=True, kw_only=True)
class FinalRow(FinalIn):
    """A stored final report with its match and scores (the text: API and console only)."""

    id: int
    received_at: datetime
    draft_id: int | None
    matched_at: datetime | None
    model_name: str | None
    model_version: str | None
    draft_labels: dict[str, Any] | None
    final_labels: dict[str, Any] | None
    agreement: float | None
    discrepancies: list[dict[str, Any]] | None
    significant: bool
    bleu4: float | None
    rouge_l: float | None
    turnaround_s: float | None

    @classmethod
    def of(cls, f: FinalReport) -> FinalRow:
        """Build from the ORM row."""
        return cls(**{name: getattr(f, name) for name in cls.__dataclass_fields__})


def record_final(session: Session, final: FinalIn, *, actor: str) -> tuple[int, bool]:
    """Store a final report unless stored already; audit ``final.receive``. Commits.

    Returns
    -------
    tuple
        ``(id, new)``: the row's id, and whether this call stored it (``False``: the same
        source and object UID were stored before; nothing changed).
    """

    return in_transaction(session, lambda: _add_final(session, final, actor=actor))


def record_review(session: Session, final: FinalIn, *, actor: str) -> int:
    """Store a reviewer's decision on job ``final.job_id``'s draft as a final report
    (source ``review``), audited ``final.receive`` and ``draft.review`` in the same
    transaction. Commits; returns the row's id.

    Raises
    ------
    ValueError
        ``final`` is not a review of a job (its source is not ``review`` or it names no job).
    """
    if final.source is not FinalSource.review or final.job_id is None:
        raise ValueError("record_review takes a review of a job (source review, job_id set)")

    def work() -> int:
        final_id, _new = _add_final(session, final, actor=actor)
        add_audit(
            session,
            actor=actor,
            action="draft.review",
            target=f"job:{final.job_id}",
            detail={"decision": final.review_decision, "final": final_id},
        )
        return final_id

    return in_transaction(session, work)


def _add_final(session: Session, final: FinalIn, *, actor: str) -> tuple[int, bool]:
    """Add ``final`` with its ``final.receive`` audit row unless its source and object UID
    are stored already (no commit); ``(id, new)`` as :func:`record_final`."""
    found = session.scalars(
        select(FinalReport.id).where(
            FinalReport.source == final.source, FinalReport.object_uid == final.object_uid
        )
    ).first()
    if found is not None:
        return int(found), False
    row = FinalReport(**vars(final), received_at=utcnow(), significant=False)
    session.add(row)
    session.flush()
    add_audit(
        session,
        actor=actor,
        action="final.receive",
        target=f"study:{final.study_uid}" if final.study_uid else None,
        detail={"final": row.id, "source": final.source.value, "verified": final.verified},
    )
    return int(row.id), True


def draft_for(session: Session, study_uid: str | None, accession: str | None) -> DraftMatch | None:
    """The newest report draft of the study named by UID (preferred) or accession number:
    that of its latest job (made from the most instances, whichever finished first) that
    is done and not withdrawn; ``None`` when there is none yet."""
    if study_uid:
        return _newest_draft(session, Study.study_instance_uid == study_uid)
    if accession:
        return _newest_draft(session, Study.accession_number == accession)
    return None


def draft_of_job(session: Session, job_id: int) -> DraftMatch | None:
    """Job ``job_id``'s report draft when the job is done, not withdrawn and its draft is
    the study's current one (no later job superseded it); else ``None``.

    Raises
    ------
    JobNotFound
        When no job has that id.
    """
    if session.get(Job, job_id) is None:
        raise JobNotFound(f"job {job_id} does not exist")
    mine = _newest_draft(session, Job.id == job_id)
    if mine is None:
        return None
    current = draft_for(session, mine.study_uid, None)
    return mine if current is not None and current.job_id == job_id else None


def _newest_draft(session: Session, which: Any) -> DraftMatch | None:
    row = session.execute(
        select(Draft, Job.id, Study.study_instance_uid)
        .join(Job, Job.id == Draft.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(
            which,
            Draft.task == "report",
            Job.state == JobState.done,
            Job.withdrawn_at.is_(None),
        )
        .order_by(Job.id.desc(), Draft.id.desc())  # the latest job's: the newest draft
        .limit(1)
    ).first()
    if row is None:
        return None
    draft, job_id, uid = row
    return DraftMatch(
        job_id=int(job_id),
        draft_id=int(draft.id),
        study_uid=str(uid),
        text=draft.full_text,
        model_name=draft.model_name,
        model_version=draft.model_version,
        drafted_at=draft.created_at,
    )


def save_scores(session: Session, final_id: int, match: DraftMatch, scores: PairScores) -> None:
    """Record the match and the pair's concordance; audit ``final.match``. Commits."""

    def work() -> None:
        f = session.get(FinalReport, final_id, with_for_update=True)
        if f is None:
            raise LookupError(f"final report {final_id} does not exist")
        f.job_id, f.draft_id, f.matched_at = match.job_id, match.draft_id, utcnow()
        f.model_name, f.model_version = match.model_name, match.model_version
        f.draft_labels, f.final_labels = scores.draft_labels, scores.final_labels
        f.agreement, f.discrepancies = scores.agreement, scores.discrepancies
        f.significant = bool(scores.discrepancies)
        f.bleu4, f.rouge_l, f.turnaround_s = scores.bleu4, scores.rouge_l, scores.turnaround_s
        add_audit(
            session,
            actor="system",
            action="final.match",
            target=f"job:{match.job_id}",
            detail={"final": final_id, "significant": f.significant},
        )

    in_transaction(session, work)


def unmatched_finals(session: Session, *, limit: int = 100) -> list[FinalRow]:
    """Final reports not matched yet whose study now has a finished report draft."""
    has_draft = (
        select(Draft.id)
        .join(Job, Job.id == Draft.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(
            Draft.task == "report",
            Job.state == JobState.done,
            Job.withdrawn_at.is_(None),
            or_(
                Study.study_instance_uid == FinalReport.study_uid,
                and_(
                    FinalReport.study_uid.is_(None),
                    Study.accession_number == FinalReport.accession_number,
                ),
            ),
        )
        .exists()
    )
    rows = session.scalars(
        select(FinalReport)
        .where(FinalReport.job_id.is_(None), has_draft)
        .order_by(FinalReport.id)
        .limit(limit)
    )
    return [FinalRow.of(f) for f in rows]


def finals_for_job(session: Session, job_id: int) -> list[FinalRow]:
    """The final reports matched to a job's draft, oldest first."""
    rows = session.scalars(
        select(FinalReport).where(FinalReport.job_id == job_id).order_by(FinalReport.id)
    )
    return [FinalRow.of(f) for f in rows]


def _newest_of_its_draft() -> Any:
    """A condition on :class:`FinalReport`: no later final (higher id) is scored against the
    same draft. A draft is one pair in the statistics, scored against its newest final: a
    corrected final (HL7 OBR-25 ``C``, table 0123: it replaces the final result), the same
    report sent again over DICOM and HL7, a later review at the node."""
    newer = aliased(FinalReport)
    return ~exists().where(
        newer.job_id == FinalReport.job_id,
        newer.draft_id == FinalReport.draft_id,
        newer.agreement.is_not(None),
        newer.id > FinalReport.id,
    )


def pair_rows(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    model_version: str | None = None,
    significant_only: bool = False,
    limit: int | None = None,
) -> list[FinalRow]:
    """Scored pairs by time received, oldest first, filtered as given: one per draft, its
    newest final (an earlier final of the same draft is replaced, not counted)."""
    conds: list[Any] = [FinalReport.agreement.is_not(None), _newest_of_its_draft()]
    if since is not None:
        conds.append(FinalReport.received_at >= since)
    if until is not None:
        conds.append(FinalReport.received_at < until)
    if model_version:
        conds.append(FinalReport.model_version == model_version)
    if significant_only:
        conds.append(FinalReport.significant.is_(True))
    stmt = select(FinalReport).where(*conds).order_by(FinalReport.received_at, FinalReport.id)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [FinalRow.of(f) for f in session.scalars(stmt)]


def final_counts(session: Session) -> dict[str, int]:
    """Final reports received, matched and with a significant discrepancy."""
    total, matched, significant = session.execute(
        select(
            func.count(FinalReport.id),
            func.count(FinalReport.job_id),
            func.count(FinalReport.id).filter(FinalReport.significant.is_(True)),
        )
    ).one()
    return {"received": int(total), "matched": int(matched), "significant": int(significant)}


def rolling_agreement(session: Session, window: int) -> tuple[float | None, int]:
    """Mean agreement of the last ``window`` scored pairs (by time received; one per draft,
    as :func:`pair_rows`) and how many pairs that is; ``(None, 0)`` when none is scored."""
    last = (
        select(FinalReport.agreement)
        .where(FinalReport.agreement.is_not(None), _newest_of_its_draft())
        .order_by(FinalReport.received_at.desc(), FinalReport.id.desc())
        .limit(window)
        .subquery()
    )
    mean, n = session.execute(select(func.avg(last.c.agreement), func.count())).one()
    return (float(mean) if mean is not None else None), int(n)
