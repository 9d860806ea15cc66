"""Superseded drafts: a later job of a study drafts it from more instances, so its draft is
the newer one, whichever job finishes first.

Where a later job that is done has queued its draft, an earlier job's draft must not
arrive after it: :func:`supersede` cancels the older drafts' rows not yet sent as the
later job is done (in that transaction, under :func:`lock_study_of`; a job's objects are
sent only once it is done, :func:`node.db.delivery_claims.claim_due_deliveries`),
:func:`not_superseded` keeps a re-send from sending one again, and :func:`later_drafts`
tells a withdrawal where a later draft replaced this one (docs/policies.md, "Superseded
drafts"). A later job that fails or is cancelled supersedes nothing.

HL7 v2 results are the order's: an earlier draft's HL7 withdrawal is held back while a
later result replaces it there or will (:func:`order_replaced`,
:func:`hold_order_withdrawals`), and goes out once none will
(:func:`restore_order_withdrawals`: the later draft withdrawn before it went out, or
its result refused at its only attempt).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, true
from sqlalchemy.orm import Session, aliased

from node.db.models import (
    AuditLog,
    Delivery,
    DeliveryKind,
    DeliveryObject,
    DeliveryState,
    Job,
    JobState,
    Study,
)
from node.db.queries import locked_deliveries

__all__ = [
    "cancel_superseded",
    "hold_order_withdrawals",
    "later_drafts",
    "later_withdrawn",
    "lock_order_studies",
    "lock_study_of",
    "log_superseded",
    "not_superseded",
    "order_replaced",
    "order_replacing",
    "restore_order_withdrawals",
    "result_failed",
    "supersede",
]

# the delivery queue's changes log under one name, whichever module they live in
log = logging.getLogger("node.db.deliveries")


def lock_study_of(session: Session, job_id: int) -> None:
    """Lock the row of job ``job_id``'s study (before the job's: the order ingest takes).

    Two jobs of one study queuing their drafts at once would otherwise each miss the
    other's rows, not yet committed (PostgreSQL, READ COMMITTED): the later job would find
    no row of the earlier one to cancel, and the earlier one no later draft.
    ``FOR NO KEY UPDATE``, which the key check of a job row written twice in one
    transaction (``FOR KEY SHARE`` on its study) does not wait for: an earlier job ending
    ``failed`` or ``cancelled`` (its rows locked, then its error written) would otherwise
    deadlock with a later job's finish (the study locked, then those rows).
    """
    study = select(Job.study_id).where(Job.id == job_id).scalar_subquery()
    session.execute(select(Study.id).where(Study.id == study).with_for_update(key_share=True))


def lock_order_studies(session: Session, *where: Any) -> None:
    """Lock the rows of the studies of the HL7 delivery rows matching ``where`` (a re-send's
    choice), in id order, before any delivery row: a re-send of an HL7 result or withdrawal
    holds back other jobs' rows of the study (:func:`cancel_superseded`,
    :func:`hold_order_withdrawals`), as the finish, the withdrawal and a refusal do under
    :func:`lock_study_of`, which take the study first."""
    jobs = select(Delivery.job_id).where(*where, Delivery.kind == DeliveryKind.hl7)
    studies = select(Job.study_id).where(Job.id.in_(jobs))
    session.execute(
        select(Study.id)
        .where(Study.id.in_(studies))
        .order_by(Study.id)
        .with_for_update(key_share=True)
    )


def later_withdrawn(session: Session, job_id: int) -> tuple[int, str] | None:
    """The newest later draft of job ``job_id``'s study, as ``(its job id, its withdrawal's
    reason)``, when it is withdrawn; ``None`` when no later job of the study is done with a
    draft, or the newest one stands (it supersedes this one).

    Withdrawn, the newest draft took the drafts it superseded with it
    (:func:`node.db.withdrawals.withdraw_job`), and job ``job_id``'s is one of them: the job
    finishes only after that withdrawal (it had read the study before a late instance came).
    Call under :func:`lock_study_of`, which the withdrawal takes too, so that one in
    progress is seen once it is committed.
    """
    study = select(Job.study_id).where(Job.id == job_id).scalar_subquery()
    newest = session.execute(
        select(Job.id, Job.withdrawn_at, Job.withdrawn_reason)
        .where(
            Job.study_id == study,
            Job.id > job_id,
            Job.state == JobState.done,
            Job.sr_sop_instance_uid.is_not(None),
        )
        .order_by(Job.id.desc())
        .limit(1)
    ).first()
    if newest is None or newest.withdrawn_at is None:
        return None
    return newest.id, newest.withdrawn_reason or f"withdrawn with job {newest.id}"


def later_drafts(
    session: Session, job_id: int, destinations: Collection[str], *, besides: Collection[int] = ()
) -> dict[str, int]:
    """Of ``destinations``, those a later job of job ``job_id``'s study that is done has
    queued its draft to, with the newest such job: where job ``job_id``'s draft is
    superseded. A later job not done yet supersedes nothing (it may fail). A row of the
    later draft counts in any state (it was sent, or will be, or may have arrived) but
    ``cancelled`` before any attempt (withdrawn before it was sent: it never got there, and
    replaced nothing).

    Parameters
    ----------
    session
        A session.
    job_id
        The job.
    destinations
        Destinations in their stored text form.
    besides
        Later jobs not to count (their draft is job ``job_id``'s own, withdrawn with it).

    Returns
    -------
    dict[str, int]
        ``{destination: newest later job id}``; empty when no later job queued there.
    """
    return _newest_later(session, job_id, destinations, _may_get_there(Delivery), besides)


def order_replaced(
    session: Session, job_id: int, destinations: Collection[str], *, besides: Collection[int] = ()
) -> dict[str, int]:
    """Of ``destinations``, those where a later done draft of job ``job_id``'s study has
    replaced its result for the order for good (HL7 v2: results are the order's), with the
    newest such job: its row there was sent, or cancelled after an attempt (that draft was
    withdrawn, and its own withdrawal marks the order's result there). ``besides``: later
    jobs not to count."""
    return _newest_later(session, job_id, destinations, _settled(Delivery), besides)


def order_replacing(session: Session, job_id: int, destinations: Collection[str]) -> dict[str, int]:
    """Of ``destinations``, those where a later done draft of job ``job_id``'s study replaces
    its result for the order, or will (:func:`order_replaced`, or its row there is still to
    be sent: ``pending``, or ``failed`` not for good), with the newest such job. A row the
    receiver refused for good (:func:`_refused`) replaces nothing, nor does a later
    job whose draft is job ``job_id``'s own (the same SR: withdrawn with it)."""
    mine = session.scalar(select(Job.sr_sop_instance_uid).where(Job.id == job_id))
    replacing = and_(
        _may_get_there(Delivery),
        ~_refused(Delivery),
        Job.sr_sop_instance_uid.is_distinct_from(mine),
    )
    return _newest_later(session, job_id, destinations, replacing, ())


def _newest_later(
    session: Session,
    job_id: int,
    destinations: Collection[str],
    condition: Any,
    besides: Collection[int],
) -> dict[str, int]:
    """``{destination: newest later job id}`` of the draft rows (not withdrawals) of job
    ``job_id``'s study's later done jobs, but ``besides``, to ``destinations`` that meet
    ``condition``."""
    study = select(Job.study_id).where(Job.id == job_id).scalar_subquery()
    newer: dict[str, int] = {}
    rows = session.execute(
        select(Delivery.destination, func.max(Delivery.job_id))
        .join(Job, Job.id == Delivery.job_id)
        .where(
            Job.study_id == study,
            Job.id > job_id,
            Job.state == JobState.done,
            Job.id.not_in(list(besides)),
            Delivery.destination.in_(list(destinations)),
            Delivery.object != DeliveryObject.withdrawal,
            condition,
        )
        .group_by(Delivery.destination)
    )
    for destination, newest in rows:
        if newest is not None:
            newer[destination] = newest
    return newer


def supersede(session: Session, job_id: int, now: datetime) -> dict[int, list[int]]:
    """Job ``job_id``'s draft supersedes the study's older ones: the job is done (in the
    transaction that marks it so, or it was already), under :func:`lock_study_of`.
    :func:`cancel_superseded` for the destinations of the job's draft rows that will be
    sent or may have arrived (not one cancelled before any attempt: an earlier run's that
    this run did not queue again), with those a later job that is done has queued its
    draft to (:func:`later_drafts`)."""
    destinations = set(
        session.scalars(
            select(Delivery.destination).where(
                Delivery.job_id == job_id,
                Delivery.object != DeliveryObject.withdrawal,
                _may_get_there(Delivery),
            )
        )
    )
    if not destinations:
        return {}
    newer = later_drafts(session, job_id, destinations)
    return cancel_superseded(session, job_id, destinations, newer, now)


def log_superseded(job_id: int, cancelled: Mapping[int, list[int]]) -> None:
    """Log, once committed, what :func:`supersede` cancelled for job ``job_id``'s draft
    (job ids and a count only)."""
    if cancelled:
        log.info(
            "job %s done: %d unsent draft delivery(ies) of job(s) %s cancelled, superseded",
            job_id,
            sum(map(len, cancelled.values())),
            ", ".join(map(str, cancelled)),
        )


def cancel_superseded(
    session: Session,
    job_id: int,
    destinations: Collection[str],
    newer: Mapping[str, int],
    now: datetime,
) -> dict[int, list[int]]:
    """Cancel the unsent draft rows of a study's older drafts to ``destinations``.

    In the caller's transaction (no commit). A later job of the study drafts it from more
    instances, so its draft is the newer one, whichever finishes first:

    - the rows of the study's earlier jobs (lower id) to one of ``destinations`` (text form
      as stored) are cancelled ("cancelled: superseded by job <job_id> before it was sent");
    - this job's own rows to a destination a later job, done, has queued its draft to are
      cancelled too ("cancelled: superseded by job <later> before it was sent"): this job
      finished after a later one (a re-run after its lease passed, a retry).

    Only rows ``pending`` (queued, waiting for a retry, or being sent) or ``failed``, and not
    a ``withdrawal``, are cancelled, as a withdrawal cancels them: a send in flight loses its
    claim and its result is not recorded. One withdrawal is cancelled too: an earlier
    draft's HL7 withdrawal to one of ``destinations`` not sent ("cancelled: job <job_id>'s
    result replaces the order's before it was sent"), attempted or not, since HL7 v2
    results are the order's: sent, or sent again, after this draft's ORU^R01 it would mark
    the newer result wrong, which replaces the withdrawn one there either way (as a
    withdrawal skips an HL7 destination a later draft went to). Rows to other destinations,
    sent rows and other withdrawals are left alone. One audit entry
    (``delivery.supersede``, actor ``system``, target ``job:<job_id>``) names the cancelled
    rows and their jobs; nothing is written when no row qualifies.

    Parameters
    ----------
    session
        A write session inside a transaction that holds the job's lock.
    job_id
        The job, done, whose draft was queued.
    destinations
        The destinations it was queued to.
    newer
        Of those, the ones a later job has queued its draft to, with that job
        (:func:`later_drafts`, in the same transaction).
    now
        The time of the audit entry.

    Returns
    -------
    dict[int, list[int]]
        The cancelled delivery ids by job id (empty: none cancelled).
    """
    study = select(Job.study_id).where(Job.id == job_id).scalar_subquery()
    draft = Delivery.object != DeliveryObject.withdrawal
    earlier = select(Job.id).where(Job.study_id == study, Job.id < job_id)
    rows = locked_deliveries(
        session,
        or_(
            and_(
                Delivery.job_id.in_(earlier),
                Delivery.destination.in_(list(destinations)),
                or_(draft, Delivery.order_withdrawal),
            ),
            and_(Delivery.job_id == job_id, Delivery.destination.in_(list(newer)), draft),
        ),
        Delivery.unsent,
    )
    cancelled: dict[int, list[int]] = {}
    for row in rows:
        by = newer[row.destination] if row.job_id == job_id else job_id
        if row.object is DeliveryObject.withdrawal:
            _hold_back(row, by)
        else:
            row.cancel(f"cancelled: superseded by job {by} before it was sent")
        cancelled.setdefault(row.job_id or 0, []).append(row.id)  # job_id: never empty here
    if cancelled:
        ids = [r.id for r in rows]
        _audit(session, now, "delivery.supersede", job_id, cancelled=ids, jobs=sorted(cancelled))
    return cancelled


def hold_order_withdrawals(
    session: Session, job_id: int, rows: Collection[Delivery], now: datetime
) -> dict[int, list[int]]:
    """Hold back, cancelled, those of ``rows`` (job ``job_id``'s, just queued) that are HL7
    withdrawals to a destination where a later done draft of the study replaces its result
    for the order, or will (its ORU^R01 sent, or still to be sent): sent after that result,
    OBX-11 ``W`` for the order would mark the newer result wrong (HL7 v2.5.1 section 7.4.1),
    as :func:`cancel_superseded` cancels such a withdrawal queued before the later draft was
    done, with the same error. :func:`restore_order_withdrawals` queues one again where that
    result never replaces it (withdrawn before it went out, or refused for good). One audit
    entry ``delivery.supersede`` per later job (actor ``system``, target ``job:<later>``).

    In the caller's transaction, under :func:`lock_study_of`. Returns the held row ids by
    the later job named."""
    orders = [row for row in rows if row.order_withdrawal]
    newer = order_replacing(session, job_id, {row.destination for row in orders})
    held: dict[int, list[int]] = {}
    for row in orders:
        if row.destination in newer:
            _hold_back(row, newer[row.destination])
            held.setdefault(newer[row.destination], []).append(row.id)
    for by, ids in held.items():
        _audit(session, now, "delivery.supersede", by, cancelled=ids, jobs=[job_id])
    return held


def _hold_back(row: Delivery, by: int) -> None:
    """Cancel HL7 withdrawal ``row``: job ``by``'s result replaces the order's where it goes
    (:func:`restore_order_withdrawals` may queue it again)."""
    row.cancel(f"cancelled: job {by}'s result replaces the order's before it was sent")


def _audit(session: Session, now: datetime, action: str, job_id: int, **detail: Any) -> None:
    """An audit entry of the superseding (actor ``system``, target ``job:<job_id>``, the job
    whose draft supersedes, or whose result failed): ``delivery.supersede``, the rows
    ``cancelled`` and their ``jobs``; ``delivery.restore``, the ``refused`` row and the rows
    ``restored``."""
    session.add(
        AuditLog(at=now, actor="system", action=action, target=f"job:{job_id}", detail=detail)
    )


def restore_order_withdrawals(
    session: Session,
    before: int,
    now: datetime,
    *,
    to: Collection[str] | None = None,
    not_to: Collection[str] = (),
) -> list[int]:
    """Queue again the HL7 withdrawals of the drafts of job ``before``'s study earlier than
    it that a later draft's result held back (:func:`cancel_superseded`,
    :func:`hold_order_withdrawals`: an HL7 withdrawal is cancelled for nothing else) to a
    destination where no later done draft replaces the withdrawn result for the order any
    more, nor will: the later drafts there were withdrawn before their ORU^R01 went out, or
    the receiver refused it at its only attempt (:func:`_refused`). The withdrawn result is
    then still the order's there,
    and must be marked wrong. Only destinations in ``to`` (all when ``None``) and not in
    ``not_to``.

    In the caller's transaction, under :func:`lock_study_of`. Returns the row ids queued
    again (:meth:`Delivery.requeue`)."""
    study = select(Job.study_id).where(Job.id == before).scalar_subquery()
    earlier = select(Job.id).where(Job.study_id == study, Job.id < before)
    rows = locked_deliveries(
        session,
        Delivery.job_id.in_(earlier),
        Delivery.order_withdrawal,
        Delivery.state == DeliveryState.cancelled,
        Delivery.destination.in_(list(to)) if to is not None else true(),
        Delivery.destination.not_in(list(not_to)),
    )
    restored: list[int] = []
    for row in rows:
        if not order_replacing(session, row.job_id or 0, [row.destination]):
            row.requeue(now)
            restored.append(row.id)
    return restored


def result_failed(session: Session, job_id: int, delivery_id: int, now: datetime) -> list[int]:
    """Row ``delivery_id`` of job ``job_id`` (done) has just failed for good
    (:func:`node.db.delivery_claims.mark_failed`): when it is the job's HL7 result, queue
    again the study's earlier drafts' HL7 withdrawals it held back at its destination
    that no later result replaces now, nor will (:func:`restore_order_withdrawals`; a
    result of which an attempt may have been filed still does, :func:`_refused`). One
    audit entry ``delivery.restore`` (actor ``system``, target ``job:<job_id>``, the
    refused row and those queued again) when any is. In the caller's transaction, under
    :func:`lock_study_of`. The row ids queued again."""
    row = session.get_one(Delivery, delivery_id)
    if row.kind is not DeliveryKind.hl7 or row.object is DeliveryObject.withdrawal:
        return []
    restored = restore_order_withdrawals(session, job_id, now, to=[row.destination])
    if restored:
        _audit(session, now, "delivery.restore", job_id, refused=delivery_id, restored=restored)
    return restored


def _settled(row: Any) -> Any:
    """A condition on a :class:`Delivery` (or an alias): its object is at the receiver
    (``sent``), or may be and was cancelled since (its draft withdrawn after an attempt not
    refused, :func:`_refused`)."""
    return or_(
        row.state == DeliveryState.sent,
        and_(row.state == DeliveryState.cancelled, row.may_have_reached, ~_refused(row)),
    )


def _refused(row: Any) -> Any:
    """A condition on a :class:`Delivery` (or an alias): its object is not at the receiver
    for certain. Queued once and never again (``queued_at`` is its ``created_at``: no
    re-send, re-check or re-run queued it again), its first attempt was its only one
    (``attempts`` 1: no claim before it lapsed unanswered) and failed for good
    (``permanent_failure``: the receiver refused it, or its file was gone); ``failed``, or
    ``cancelled`` since (a later draft superseded it). Any other attempted row may have
    been filed: one sent, one unanswered, or a copy of one."""
    return and_(
        row.permanent_failure.is_(True),
        row.attempts == 1,
        row.queued_at == row.created_at,
        row.state.in_([DeliveryState.failed, DeliveryState.cancelled]),
    )


def _may_get_there(row: Any) -> Any:
    """A condition on a :class:`Delivery` (or an alias of it): the row will be sent, or may
    have arrived (:attr:`Delivery.may_have_reached`); not one cancelled before any
    attempt."""
    return or_(row.state != DeliveryState.cancelled, row.may_have_reached)


def not_superseded() -> Any:
    """A condition on :class:`Delivery`: not a draft row of a job whose draft a later job of
    the study has queued to the same destination (as :func:`later_drafts` counts them: what
    :func:`cancel_superseded` cancels while unsent). A re-send leaves such a row, sent or
    not: the older draft must not reach that destination after the newer one."""
    mine, later = aliased(Job), aliased(Job)
    newer = aliased(Delivery)
    superseded = exists().where(
        mine.id == Delivery.job_id,
        later.study_id == mine.study_id,
        later.id > mine.id,
        later.state == JobState.done,
        newer.job_id == later.id,
        newer.destination == Delivery.destination,
        newer.object != DeliveryObject.withdrawal,
        _may_get_there(newer),
    )
    return or_(Delivery.object == DeliveryObject.withdrawal, ~superseded)
