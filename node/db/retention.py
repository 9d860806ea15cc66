"""Retention: deleting studies past ``retention_days`` with everything made from them, and
the receive log past ``receive_log_days``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from node.db.audit import add_audit
from node.db.conversations import delete_conversations
from node.db.jobs import ACTIVE_JOB_STATES
from node.db.models import (
    Association,
    Delivery,
    DeliveryState,
    Draft,
    FinalReport,
    Instance,
    Job,
    JobState,
    RefusedInstance,
    Series,
    Study,
    StudyState,
)
from node.db.tx import in_transaction
from node.spool_layout import draft_sr_path

__all__ = ["purge_expired_studies", "purge_receive_log"]


def _purge_jobless_deliveries(session: Session, older_than: datetime) -> list[str]:
    """Delete delivery rows without a job (a synthetic Secondary Capture sent on request)
    created before ``older_than`` and no longer pending; return their files."""
    done = (
        Delivery.job_id.is_(None),
        Delivery.created_at < older_than,
        Delivery.state != DeliveryState.pending,
    )
    found = list(session.scalars(select(Delivery.sr_path).where(*done)))
    session.execute(delete(Delivery).where(*done))
    return [p for p in found if p]


def _purge_conversations(session: Session, older_than: datetime, study_uids: list[str]) -> None:
    """Delete stale conversations and those about ``study_uids``; audit how many went."""
    n = delete_conversations(session, older_than=older_than, study_uids=study_uids)
    if n:
        add_audit(
            session,
            actor="system",
            action="retention.conversations",
            target=None,
            detail={"conversations": n, "older_than": older_than.astimezone(UTC).isoformat()},
        )


def _expired_study_ids(session: Session, older_than: datetime, limit: int) -> list[int]:
    """Up to ``limit`` studies last received before ``older_than``, not receiving, with no
    active or running job; locked (others' locked rows are skipped)."""
    busy = select(Job.study_id).where(Job.state.in_((*ACTIVE_JOB_STATES, JobState.running)))
    return list(
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


def _sr_paths(session: Session, ids: list[int]) -> set[str]:
    """The spool-relative files of the studies' jobs: their draft SRs and whatever file
    a delivery row of theirs names."""
    job_ids = select(Job.id).where(Job.study_id.in_(ids))
    srs = {
        draft_sr_path(str(sr_uid))
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
    return srs


def _delete_studies(session: Session, ids: list[int]) -> None:
    """Delete the studies and everything under them, children first (no reliance on ON
    DELETE CASCADE being enforced)."""
    job_ids = select(Job.id).where(Job.study_id.in_(ids))
    session.execute(delete(FinalReport).where(FinalReport.job_id.in_(job_ids)))
    session.execute(delete(Draft).where(Draft.job_id.in_(job_ids)))
    session.execute(delete(Delivery).where(Delivery.job_id.in_(job_ids)))
    session.execute(delete(Job).where(Job.study_id.in_(ids)))
    session.execute(delete(Instance).where(Instance.study_id.in_(ids)))
    session.execute(delete(Series).where(Series.study_id.in_(ids)))
    session.execute(delete(Study).where(Study.id.in_(ids)))


def purge_expired_studies(session: Session, *, older_than: datetime, limit: int = 500) -> list[str]:
    """Delete studies last received before ``older_than`` that have no active or running job.

    Their series, instances, jobs, drafts and deliveries go with them (cascade); the audit
    log stays. Commits; returns the spool paths (relative) that the caller should delete:
    the instances' files and the jobs' SRs (``outputs/<SR SOP Instance UID>.dcm``, and any
    other path a delivery row names). The SR UID derives from the Study Instance UID, which
    is unique, so no surviving study shares these SR files. Delivery rows without a job (a
    synthetic Secondary Capture sent on request) created before ``older_than`` and no
    longer pending go too, with their files, as do the purged jobs' final reports and final
    reports received before ``older_than`` that never found their draft. Conversations
    (:mod:`node.db.conversations`) not updated since ``older_than``, and those about a
    purged study, go with their turns.
    """

    def work() -> list[str]:
        sc_paths = _purge_jobless_deliveries(session, older_than)
        # final reports: those of purged jobs go with them; unmatched ones age out alone
        session.execute(
            delete(FinalReport).where(
                FinalReport.job_id.is_(None), FinalReport.received_at < older_than
            )
        )
        ids = _expired_study_ids(session, older_than, limit)
        if not ids:
            _purge_conversations(session, older_than, [])
            return sc_paths
        _purge_conversations(
            session,
            older_than,
            list(session.scalars(select(Study.study_instance_uid).where(Study.id.in_(ids)))),
        )
        paths = list(session.scalars(select(Instance.spool_path).where(Instance.study_id.in_(ids))))
        srs = _sr_paths(session, ids)
        _delete_studies(session, ids)
        add_audit(
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

    return in_transaction(session, work)


def purge_receive_log(session: Session, *, older_than: datetime) -> int:
    """Delete receive log associations that started before ``older_than``, with their
    refused instances; the instances they delivered stay (``association_id`` becomes NULL).
    Refused rows without an association recorded before ``older_than`` go too.

    Commits (with a ``retention.receive_log`` audit row when anything was deleted); returns
    the number of associations deleted.
    """

    def work() -> int:
        old = select(Association.id).where(Association.started_at < older_than)
        # explicit, children first (no reliance on ON DELETE being enforced)
        session.execute(
            update(Instance)
            .where(Instance.association_id.in_(old))
            .values(association_id=None)
            .execution_options(synchronize_session=False)
        )
        refused = session.execute(
            delete(RefusedInstance)
            .where(
                or_(
                    RefusedInstance.association_id.in_(old),
                    RefusedInstance.association_id.is_(None) & (RefusedInstance.at < older_than),
                )
            )
            .execution_options(synchronize_session=False)
        )
        result = session.execute(
            delete(Association)
            .where(Association.started_at < older_than)
            .execution_options(synchronize_session=False)
        )
        n = int(getattr(result, "rowcount", 0) or 0)
        if n:
            add_audit(
                session,
                actor="system",
                action="retention.receive_log",
                target=None,
                detail={
                    "associations": n,
                    "refused_instances": int(getattr(refused, "rowcount", 0) or 0),
                    "older_than": older_than.astimezone(UTC).isoformat(),
                },
            )
        return n

    return in_transaction(session, work)
