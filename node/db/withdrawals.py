"""Withdrawing a sent draft: the job is marked, unsent objects cancelled.

The withdrawal objects themselves are built and queued by
:func:`node.runtime.withdrawal.withdraw`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.jobs import JobConflict, lock_job, mark_finished
from node.db.models import (
    AuditLog,
    Delivery,
    DeliveryObject,
    Job,
    JobState,
    utcnow,
)
from node.db.queries import locked_deliveries
from node.db.superseded import (
    later_withdrawn,
    lock_study_of,
    log_superseded,
    restore_order_withdrawals,
    supersede,
)
from node.db.tx import in_transaction

__all__ = ["REASON_MAX_LENGTH", "Withdrawal", "check_reason", "finish_job", "withdraw_job"]

#: the longest reason a withdrawal takes (``POST /api/jobs/{id}/withdraw``, ``cxr-node jobs
#: withdraw``); it is sent to every receiver
REASON_MAX_LENGTH = 256


def check_reason(reason: str) -> str:
    """A withdrawal's reason as stored and sent: ``reason`` without surrounding spaces.

    Raises
    ------
    ValueError
        An empty reason, one over :data:`REASON_MAX_LENGTH` characters, or one with a NUL
        character (no text the node sends, HL7 ER7 or DICOM, carries one; a PostgreSQL text
        cannot hold one).
    """
    reason = reason.strip()
    if not reason:
        raise ValueError("a reason is required: say why the draft is withdrawn")
    if "\x00" in reason:
        raise ValueError("a reason cannot contain a NUL character")
    if len(reason) > REASON_MAX_LENGTH:
        raise ValueError(f"a reason is at most {REASON_MAX_LENGTH} characters, got {len(reason)}")
    return reason


@dataclass(frozen=True)
class Withdrawal:
    """What :func:`withdraw_job` did to one draft: rows cancelled, destinations that need a
    withdrawal."""

    job_id: int
    cancelled: list[int]
    #: destination text -> the draft rows (object, file, object UID) it may hold
    reached: dict[str, list[tuple[DeliveryObject, str, str | None]]]
    #: the study's other jobs whose draft is the same SR (withdrawn with it)
    same_draft: list[int]
    #: why (sent to the receivers)
    reason: str
    #: the study's earlier drafts this one superseded, withdrawn with it (newest first;
    #: only when this one was the study's current draft)
    superseded: list[Withdrawal] = field(default_factory=list)


def withdraw_job(session: Session, job_id: int, *, actor: str, reason: str) -> Withdrawal:
    """Mark a drafted job's draft withdrawn (operator action, audited ``job.withdraw``).

    The job gets ``withdrawn_at``/``withdrawn_by``/``withdrawn_reason``; its draft rows not
    sent (``pending`` or ``failed``) become ``cancelled``, so no retry or re-queue sends them
    later (a send in flight loses its claim: its result is not recorded). Each destination
    that may hold a draft object (a row sent, or attempted at least once) is returned, so
    that the caller queues a withdrawal to it.

    Withdrawn with it, in the same way and the same transaction:

    - the study's other done jobs whose SR is the same (the same draft made again from the
      same instances: one SOP Instance UID): what is withdrawn is the draft object, which the
      receivers hold once, and none of them may stay the study's current draft;
    - when the job's draft is the study's current one (no later job's draft is done and not
      withdrawn), the earlier drafts of the study it superseded, each with its own
      destinations (:attr:`Withdrawal.superseded`; one ``job.withdraw`` entry each, naming
      this job in ``with_job``): else the draft of fewer instances it replaced would become
      the current one again, at the node (review, finals, summaries) and in the PACS, the
      FHIR server and the RIS that still hold it. An earlier job still drafting goes with
      it as it finishes (:func:`finish_job`); none of its objects is sent before then.

    Commits.

    Raises
    ------
    JobNotFound
        No job with that id.
    JobConflict
        The job has no draft (not ``done``) or was withdrawn already.
    ValueError
        A reason :func:`check_reason` refuses.
    """
    reason = check_reason(reason)

    def work() -> Withdrawal:
        lock_study_of(session, job_id)  # as the enqueue: withdrawals of a study take turns
        job = lock_job(session, job_id)
        if job.withdrawn_at is not None:
            raise JobConflict(f"job {job_id}: the draft was withdrawn already")
        if job.state is not JobState.done or not job.sr_sop_instance_uid:
            raise JobConflict(f"job {job_id} is {job.state.value}: it has no draft to withdraw")
        return _withdraw(session, job, actor, reason)

    return in_transaction(session, work)


def finish_job(session: Session, job_id: int, *, owner: str, **details: Any) -> Withdrawal | None:
    """Finish job ``job_id`` (:func:`node.db.jobs.mark_finished`, with ``details``): from
    this commit on, its objects are sent (:func:`node.db.delivery_claims.claim_due_deliveries`).
    In the same transaction, under the study's lock:

    - when the study's newest later draft is withdrawn
      (:func:`node.db.superseded.later_withdrawn`), the job's draft is withdrawn: the job
      had read the study before a late instance came and finished only after that
      withdrawal, which would have taken its draft had it been done then. The withdrawal is
      as :func:`withdraw_job`'s, by ``system`` with the later one's reason, ``with_job``
      naming it in the audit entry, so the job is never the study's current draft, and none
      of its objects goes out. Both take the study's lock first, so the two cannot miss
      each other;
    - else its draft supersedes the study's older ones (:func:`node.db.superseded.supersede`:
      their rows not sent to its destinations are cancelled, and its own where a later done
      draft went). Commits.

    Returns
    -------
    Withdrawal or None
        What was withdrawn, for the caller to queue the withdrawals; ``None`` when the job
        just finished.

    Raises
    ------
    node.db.jobs.LeaseLost
        When ``owner`` no longer holds the job.
    """

    superseded: dict[int, list[int]] = {}

    def work() -> Withdrawal | None:
        lock_study_of(session, job_id)
        job = mark_finished(session, job_id, owner=owner, **details)
        later = later_withdrawn(session, job_id)
        if later is None or not job.sr_sop_instance_uid:
            superseded.update(supersede(session, job_id, utcnow()))
            return None
        later_id, reason = later
        return _withdraw(session, job, "system", reason, with_job=later_id)

    withdrawn = in_transaction(session, work)
    log_superseded(job_id, superseded)
    return withdrawn


def _withdraw(session: Session, job: Job, actor: str, reason: str, **about: object) -> Withdrawal:
    """Withdraw done job ``job``'s draft (locked), its twins and, when it is the study's
    current draft, the drafts it superseded (:func:`withdraw_job`); ``about`` goes to its
    audit entry."""
    now = utcnow()
    drafts = _drafts_by_sr(session, job)
    mine = drafts.pop(job.sr_sop_instance_uid or "")
    current = not any(twins[0].id > job.id for twins in drafts.values())
    earlier = list(drafts.values()) if current else []
    for each in (*mine, *(j for twins in earlier for j in twins)):
        each.withdrawn_at = now
        each.withdrawn_by = actor[:128]
        each.withdrawn_reason = reason
    superseded = [
        _withdraw_draft(session, twins, actor, reason, now, with_job=job.id) for twins in earlier
    ]
    main = _withdraw_draft(
        session,
        [job, *(j for j in mine if j.id != job.id)],
        actor,
        reason,
        now,
        superseded=[w.job_id for w in superseded],
        **about,
    )
    return replace(main, superseded=superseded)


def _drafts_by_sr(session: Session, job: Job) -> dict[str, list[Job]]:
    """The done jobs of ``job``'s study whose draft is not withdrawn, ``job`` included,
    locked, by SR SOP Instance UID, the newest draft first and each one's newest job
    first."""
    rows = session.scalars(
        select(Job)
        .where(
            Job.study_id == job.study_id,
            Job.state == JobState.done,
            Job.withdrawn_at.is_(None),
            Job.sr_sop_instance_uid.is_not(None),
        )
        .order_by(Job.id.desc())
        .with_for_update(key_share=True)  # as lock_job
    )
    drafts: dict[str, list[Job]] = {}
    for row in rows:
        drafts.setdefault(row.sr_sop_instance_uid or "", []).append(row)
    return drafts


def _withdraw_draft(
    session: Session,
    jobs: list[Job],
    actor: str,
    reason: str,
    now: datetime,
    **about: object,
) -> Withdrawal:
    """Cancel the unsent rows of one draft's ``jobs`` (already marked; the first is the one
    named), find the destinations it reached, and audit ``job.withdraw`` with ``about``
    (``superseded``: the earlier drafts' jobs withdrawn with this one; ``with_job``: the job
    whose withdrawal took this superseded draft with it)."""
    job_id, same = jobs[0].id, sorted(j.id for j in jobs[1:])
    cancelled, reached = _cancel_and_reach(session, [job_id, *same])
    # its ORU^R01 held back the earlier drafts' HL7 withdrawals; where it did not go out,
    # the withdrawn result is still the order's
    restored = restore_order_withdrawals(session, max([job_id, *same]), now, not_to=reached)
    detail = {
        "reason": reason,
        "cancelled": cancelled,
        "reached": sorted(reached),
        "same_draft": same,
        **({"restored": restored} if restored else {}),
        **about,
    }
    session.add(
        AuditLog(at=now, actor=actor, action="job.withdraw", target=f"job:{job_id}", detail=detail)
    )
    return Withdrawal(job_id, cancelled, reached, same, reason)


def _cancel_and_reach(
    session: Session, job_ids: list[int]
) -> tuple[list[int], dict[str, list[tuple[DeliveryObject, str, str | None]]]]:
    """Cancel the unsent draft rows of ``job_ids``; the destinations their draft may have
    reached (:attr:`Delivery.may_have_reached`), each with its rows (object, file, object
    UID) once."""
    cancelled: list[int] = []
    reached: dict[str, list[tuple[DeliveryObject, str, str | None]]] = {}
    rows = locked_deliveries(
        session, Delivery.job_id.in_(job_ids), Delivery.object != DeliveryObject.withdrawal
    )
    for row in rows:
        held = (row.object, row.sr_path or "", row.object_uid)
        if row.may_have_reached and held not in reached.get(row.destination, []):
            reached.setdefault(row.destination, []).append(held)
        if row.unsent:
            # a failed row would otherwise be re-queued when its destination answers
            row.cancel("cancelled: the draft was withdrawn before it was sent")
            cancelled.append(row.id)
    return cancelled, reached
