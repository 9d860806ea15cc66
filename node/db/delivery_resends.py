"""Deliveries queued again: an admin's re-send of a job's rows (:func:`resend`) or of
chosen rows (:func:`resend_deliveries`), and the re-check's re-queue of a destination's
failed rows once it answers again (:func:`requeue_failed`). Each row goes back to
``pending`` (:meth:`node.db.models.Delivery.requeue`) with fresh attempts and retry
horizon, and sends the file it recorded again. Re-exported by :mod:`node.db.deliveries`.

Every function that changes state commits its own transaction
(:func:`node.db.tx.in_transaction`) and is audited. Error texts stored here name
destinations and UIDs only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.jobs import lock_job
from node.db.models import (
    AuditLog,
    Delivery,
    DeliveryKind,
    DeliveryObject,
    DeliveryState,
    Job,
    JobState,
    utcnow,
)
from node.db.queries import locked_deliveries
from node.db.superseded import (
    cancel_superseded,
    hold_order_withdrawals,
    lock_order_studies,
    lock_study_of,
    not_superseded,
)
from node.db.tx import in_transaction

__all__ = ["failed_destinations", "requeue_failed", "resend", "resend_deliveries"]

# the delivery queue's changes log under one name, whichever module they live in
log = logging.getLogger("node.db.deliveries")


def resend(session: Session, job_id: int, *, actor: str, now: datetime | None = None) -> list[int]:
    """Re-send a job's objects to all their destinations (admin action, audited). Commits.

    Every delivery row of the job goes back to ``pending``, due now, with fresh attempts and
    a fresh retry horizon; the file recorded for each row is sent again (same SOP Instance
    UID: the PACS replaces it). A row a sender may be sending (or that waits for a retry,
    :meth:`Delivery.may_be_claimed`) is left to that send: sent again at once, it would go
    twice, and lose the fence of the send under way. Rows ``cancelled`` (the draft
    withdrawn, or superseded by a later job's) stay so; of a withdrawn job only the
    withdrawals are re-sent; a draft row to a destination a later job of the study has
    queued its draft to is left as it is, sent or not (the older draft must not arrive after
    the newer one there). Over HL7, under the study's lock, a result sent again holds back
    the earlier drafts' HL7 withdrawals not sent yet, and an HL7 withdrawal sent again is
    held back where a later draft's result replaces it (:func:`_hold_orders`).

    Returns
    -------
    list[int]
        The delivery ids re-queued and left ``pending`` (empty when the job never had
        anything queued, or each row is left to a send); the audit entry lists those.

    Raises
    ------
    JobNotFound
        No job with that id.
    """
    now = now or utcnow()

    def work() -> list[int]:
        lock_study_of(session, job_id)  # first, as the finish, the withdrawal, a refusal
        job = lock_job(session, job_id)
        rows = [
            r
            for r in locked_deliveries(
                session,
                Delivery.job_id == job_id,
                Delivery.state != DeliveryState.cancelled,
                not_superseded(),
            )
            if (job.withdrawn_at is None or r.object is DeliveryObject.withdrawal)
            and not r.may_be_claimed(now)
        ]
        before = {r.id: r.state.value for r in rows}
        for row in rows:
            row.requeue(now)
        rows = _hold_orders(session, rows, now)
        session.add(
            AuditLog(
                at=now,
                actor=actor,
                action="job.resend",
                target=f"job:{job_id}",
                detail={"deliveries": {str(r.id): before[r.id] for r in rows}},
            )
        )
        return [r.id for r in rows]

    return in_transaction(session, work)


def resend_deliveries(
    session: Session,
    *,
    actor: str,
    ids: Sequence[int] = (),
    failed_to: str | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Re-send chosen deliveries (operator action, audited ``delivery.resend``). Commits.

    The rows named by ``ids``, or every ``failed`` row of destination ``failed_to``
    (permanent failures included: the operator has fixed the cause), go back to
    ``pending``, due now, with fresh attempts and retry horizon; the recorded file is sent
    again (same SOP Instance UID: the receiver replaces it). Rows still pending (queued or
    being sent), cancelled (withdrawn or superseded draft), of a withdrawn job's draft, or
    of a draft a later job of the study has queued its own to the same destination are left
    alone. Over HL7, under the studies' locks (taken first), a result sent again holds back
    the earlier drafts' HL7 withdrawals not sent yet, those chosen too, and an HL7
    withdrawal is held back where a later draft's result replaces it
    (:func:`_hold_orders`). One audit entry per affected job (target ``job:<id>``) lists its
    ids re-queued and left ``pending``, with their states before.

    Returns
    -------
    list[int]
        The delivery ids re-queued and left ``pending``.
    """
    now = now or utcnow()
    where: list[Any] = [
        Delivery.state.in_([DeliveryState.failed, DeliveryState.sent]),
        not_superseded(),
    ]
    if failed_to is not None:
        where += [Delivery.destination == failed_to, Delivery.state == DeliveryState.failed]
    else:
        where.append(Delivery.id.in_(list(ids)))

    def work() -> list[int]:
        lock_order_studies(session, *where)  # first, as the finish, the withdrawal, a refusal
        rows = locked_deliveries(session, *where, skip_locked=True)
        withdrawn = set(
            session.scalars(
                select(Job.id).where(
                    Job.id.in_({r.job_id for r in rows if r.job_id is not None}),
                    Job.withdrawn_at.is_not(None),
                )
            )
        )
        rows = [
            r for r in rows if r.job_id not in withdrawn or r.object is DeliveryObject.withdrawal
        ]
        states = {row.id: row.state.value for row in rows}
        for row in rows:
            row.requeue(now)
        rows = _hold_orders(session, rows, now)
        by_job: dict[int | None, dict[str, str]] = {}
        for row in rows:
            by_job.setdefault(row.job_id, {})[str(row.id)] = states[row.id]
        for job_id, before in by_job.items():
            session.add(
                AuditLog(
                    at=now,
                    actor=actor,
                    action="delivery.resend",
                    target=f"job:{job_id}" if job_id is not None else None,
                    detail={"deliveries": before},
                )
            )
        return [r.id for r in rows]

    return in_transaction(session, work)


def _hold_orders(session: Session, rows: Sequence[Delivery], now: datetime) -> list[Delivery]:
    """Of ``rows``, queued again by a re-send, those left ``pending``: HL7 v2 results are
    the order's, so that no withdrawal marks a newer result wrong at a RIS, in the
    transaction, under the studies' locks,

    - a done draft's HL7 result sent again holds back the study's earlier drafts' HL7
      withdrawals to its destination not sent yet (queued again when it was refused,
      :func:`node.db.superseded.restore_order_withdrawals`), those of ``rows`` too
      (:func:`node.db.superseded.cancel_superseded`); a job not done supersedes nothing;
    - an HL7 withdrawal sent again is held back where a later draft's result replaces it,
      or will (:func:`node.db.superseded.hold_order_withdrawals`).

    Both audited ``delivery.supersede``."""
    results: dict[int, set[str]] = {}
    withdrawals: dict[int, list[Delivery]] = {}
    for row in rows:
        if row.kind is not DeliveryKind.hl7 or row.job_id is None:
            continue
        if row.object is DeliveryObject.withdrawal:
            withdrawals.setdefault(row.job_id, []).append(row)
        else:
            results.setdefault(row.job_id, set()).add(row.destination)
    for job_id, orders in withdrawals.items():
        hold_order_withdrawals(session, job_id, orders, now)
    done = session.scalars(
        select(Job.id).where(Job.id.in_(list(results)), Job.state == JobState.done)
    )
    for job_id in done:
        cancel_superseded(session, job_id, results[job_id], {}, now)
    return [row for row in rows if row.state is DeliveryState.pending]


def failed_destinations(session: Session) -> list[str]:
    """Destinations with ``failed`` deliveries that a retry could fix (not permanent)."""
    return list(
        session.scalars(
            select(Delivery.destination)
            .where(Delivery.state == DeliveryState.failed, Delivery.permanent_failure.is_(False))
            .distinct()
            .order_by(Delivery.destination)
        )
    )


def _clip_target(text: str) -> str:
    return text if len(text) <= 256 else text[:253] + "..."


def requeue_failed(
    session: Session,
    destination: str,
    *,
    reason: str,
    actor: str = "system",
    now: datetime | None = None,
) -> list[int]:
    """Re-queue a destination's failed, not permanent deliveries (it answers again). Commits.

    Each row goes back to ``pending``, due now, with fresh attempts and a fresh retry
    horizon (``queued_at = now``); ``last_error`` is cleared. Rows failed permanently
    (``permanent_failure``: 0xA9xx/0xCxxx, HTTP 4xx, SR file missing) stay ``failed``. One
    audit entry (``delivery.requeue``, target ``destination:<destination>``) records the
    count, the first 100 ids and ``reason``; nothing is written when no row qualifies.

    Parameters
    ----------
    session
        A write session.
    destination
        The destination text as stored (``AET@host:port`` or the STOW-RS URL).
    reason
        Why (e.g. "C-ECHO answered"); no patient data.
    actor
        Who re-queues (``system`` for the node's own check).
    now
        The current time.

    Returns
    -------
    list[int]
        The re-queued delivery ids.
    """
    now = now or utcnow()

    def work() -> list[int]:
        rows = locked_deliveries(
            session,
            Delivery.destination == destination,
            Delivery.state == DeliveryState.failed,
            Delivery.permanent_failure.is_(False),
            skip_locked=True,
        )
        for row in rows:
            row.requeue(now)
        if rows:
            session.add(
                AuditLog(
                    at=now,
                    actor=actor,
                    action="delivery.requeue",
                    target=_clip_target(f"destination:{destination}"),
                    detail={
                        "count": len(rows),
                        "deliveries": [r.id for r in rows[:100]],
                        "reason": reason,
                    },
                )
            )
        return [r.id for r in rows]

    ids = in_transaction(session, work)
    if ids:
        log.info("%d failed deliveries to %s re-queued (%s)", len(ids), destination, reason)
    return ids
