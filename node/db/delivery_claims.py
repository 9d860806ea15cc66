"""Claims of delivery rows: a sender takes due rows under a lease and records the outcome.

A sender *claims* due ``pending`` rows (``next_attempt_at <= now``,
:func:`claim_due_deliveries`): the claim increments ``attempts`` and moves
``next_attempt_at`` forward by a short lease, so no other sender takes the row while it is
being sent (PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite: the ``BEGIN
IMMEDIATE`` transaction serializes claims). The lease end is also the claim's fencing token:
:func:`mark_sent`, :func:`mark_retry`, :func:`mark_failed` and :func:`release_claim` given
``claimed_until`` change the row only while it still carries that value, so the result of a
send that outlived its lease, or of a row re-queued or cancelled meanwhile (its draft
withdrawn or superseded), is ignored instead of overwriting newer state. If a sender dies,
the lease passes and the row is sent again. A cancelled row's send may still reach its
receiver: the study's other rows wait for it there (:func:`claim_due_deliveries`).

The rows themselves are queued by :mod:`node.db.deliveries`, which re-exports these
functions. Every function that changes state commits its own transaction
(:func:`node.db.tx.in_transaction`). Error texts stored here name destinations and UIDs only.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, or_, select, tuple_, update
from sqlalchemy.orm import Session, aliased

from node.db.job_events import add_event
from node.db.models import Delivery, DeliveryObject, DeliveryState, Job, JobState, utcnow
from node.db.superseded import lock_study_of, result_failed
from node.db.tx import in_transaction

__all__ = [
    "claim_due_deliveries",
    "mark_failed",
    "mark_retry",
    "mark_sent",
    "release_claim",
]

# the delivery queue's queries log under one name, whichever module they live in
log = logging.getLogger("node.db.deliveries")

_MAX_ERROR = 2000  # keep stored error texts bounded


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


def claim_due_deliveries(
    session: Session,
    *,
    now: datetime | None = None,
    limit: int = 8,
    lease_seconds: float = 120.0,
    owner: str | None = None,
) -> list[Delivery]:
    """Claim up to ``limit`` pending deliveries that are due, oldest first, of jobs that are
    done (or of no job: a synthetic Secondary Capture sent on request).

    A job queues its draft's objects just before it is marked done; until then they wait,
    so that nothing of a job that fails or is cancelled meanwhile goes out (its rows are
    cancelled then, :func:`node.db.jobs.transition`), and nothing of one whose draft is
    withdrawn as it finishes (:func:`node.db.withdrawals.finish_job`).

    A row also waits while a send to its destination of a row of the same study that was
    cancelled may still be under way (:meth:`~node.db.models.Delivery.cancel`; until that
    claim's end, or until the send ends, :func:`mark_sent` and the others): a withdrawal
    must not reach a receiver before the draft it withdraws, nor a newer draft before the
    older one it supersedes (which would then stand there as the current one).

    Each claimed row gets ``attempts + 1``, ``last_attempt_at = now`` and
    ``next_attempt_at = now + lease_seconds``
    (the lease: no other sender claims it before then; it is also the fencing token to pass
    as ``claimed_until`` to :func:`mark_sent` / :func:`mark_retry` / :func:`mark_failed`).
    PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so concurrent senders get different rows;
    SQLite: the ``BEGIN IMMEDIATE`` transaction serializes claims. Commits.

    Parameters
    ----------
    session
        A write session.
    now
        The current time.
    limit
        At most this many rows.
    lease_seconds
        How long the claim holds; longer than the slowest send (connect + ACSE + DIMSE).
    owner
        The claiming sender, for the log only.

    Returns
    -------
    list[Delivery]
        Detached rows as claimed (``next_attempt_at`` is the lease end).
    """
    if limit < 1:
        return []
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
    now = now or utcnow()
    lease_until = now + timedelta(seconds=lease_seconds)

    def work() -> list[Delivery]:
        rows = list(
            session.scalars(
                select(Delivery)
                .where(*_due(now), ~_behind_a_cancelled_send(now))
                .order_by(Delivery.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .execution_options(populate_existing=True)
            )
        )
        for row in rows:
            row.attempts += 1
            row.last_attempt_at = now
            row.next_attempt_at = lease_until
        return rows

    rows = in_transaction(session, work)
    if rows:
        log.debug("%s claimed deliveries %s", owner or "sender", [r.id for r in rows])
    return rows


def _due(now: datetime) -> list[Any]:
    """The conditions on :class:`Delivery` of a row due at ``now``: ``pending``, its next
    attempt come, of a job that is done (or of none)."""
    return [
        Delivery.state == DeliveryState.pending,
        or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        or_(
            Delivery.job_id.is_(None),
            exists().where(Job.id == Delivery.job_id, Job.state == JobState.done),
        ),
    ]


# built once: a statement with new aliases is compiled anew at each claim (SQLAlchemy's
# cache key holds the alias), which costs more than the query
_CANCELLED, _ITS_JOB = aliased(Delivery), aliased(Job)


def _behind_a_cancelled_send(now: datetime) -> Any:
    """A condition on :class:`Delivery`: a row of its job's study to its destination is
    cancelled with the end of a claim later than ``now`` kept, so a send of it may still be
    under way (:meth:`~node.db.models.Delivery.cancel`). One select of those (destination,
    study) pairs, not one per row, in the claim's own statement: a cancel committed before
    it is seen together with the rows it made claimable."""
    sends = (
        select(_CANCELLED.destination, _ITS_JOB.study_id)
        .join(_ITS_JOB, _ITS_JOB.id == _CANCELLED.job_id)
        .where(_CANCELLED.state == DeliveryState.cancelled, _CANCELLED.next_attempt_at > now)
    )
    study = select(Job.study_id).where(Job.id == Delivery.job_id).scalar_subquery()
    return and_(Delivery.job_id.is_not(None), tuple_(Delivery.destination, study).in_(sends))


def _fenced_update(
    session: Session,
    delivery_id: int,
    claimed_until: datetime | None,
    values: dict[str, Any],
    *,
    outcome: str,
    for_good: bool = False,
) -> bool:
    """Set ``values`` on a ``pending`` row still carrying ``claimed_until`` (when given);
    returns whether it changed. The attempt goes into the job's history (a ``delivery``
    event: destination, object, ``outcome`` sent/retry/failed, error) in the same
    transaction. ``for_good``: a failure retrying cannot fix; under the study's lock, taken
    first, the HL7 withdrawals the row's result held back go out
    (:func:`node.db.superseded.result_failed`). A row cancelled during the claim records
    nothing, but its send is over: the claim's end it kept, when it is ``claimed_until``,
    is cleared, so the study's other rows for that destination need not wait for it
    (:func:`claim_due_deliveries`). Commits."""
    conditions = [Delivery.id == delivery_id, Delivery.state == DeliveryState.pending]
    if claimed_until is not None:
        conditions.append(Delivery.next_attempt_at == claimed_until)
    now = utcnow()
    restored: list[int] = []

    def work() -> bool:
        job_id = None
        if for_good:  # first, as the finish and the withdrawal take it
            job_id = session.scalar(select(Delivery.job_id).where(Delivery.id == delivery_id))
            if job_id is not None:
                lock_study_of(session, job_id)
        res = session.execute(
            update(Delivery)
            .where(*conditions)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        changed = bool(getattr(res, "rowcount", 0))
        if changed:
            row = session.execute(
                select(
                    Delivery.job_id, Delivery.destination, Delivery.object, Delivery.attempts
                ).where(Delivery.id == delivery_id)
            ).one()
            if row.job_id is not None:
                add_event(
                    session,
                    int(row.job_id),
                    "delivery",
                    detail={
                        "delivery": delivery_id,
                        "destination": row.destination,
                        "object": DeliveryObject(row.object).value,
                        "attempt": row.attempts,
                        "outcome": outcome,
                        "error": values.get("last_error"),
                    },
                )
        if changed and job_id is not None:
            restored.extend(result_failed(session, job_id, delivery_id, now))
        if not changed and claimed_until is not None:
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery_id,
                    Delivery.state == DeliveryState.cancelled,
                    Delivery.next_attempt_at == claimed_until,
                )
                .values(next_attempt_at=None)
                .execution_options(synchronize_session=False)
            )
        return changed

    changed = in_transaction(session, work)
    if not changed:
        log.warning(
            "delivery %s: claim no longer held (re-queued, cancelled or lease passed); "
            "result not recorded",
            delivery_id,
        )
    elif restored:
        log.info(
            "delivery %s failed for good: %d earlier draft HL7 withdrawal(s) it held back "
            "queued again",
            delivery_id,
            len(restored),
        )
    return changed


def mark_sent(
    session: Session,
    delivery_id: int,
    *,
    claimed_until: datetime | None = None,
    note: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Record a successful store: ``sent`` with ``sent_at``. Commits.

    Parameters
    ----------
    session
        A write session.
    delivery_id
        The row.
    claimed_until
        The lease end from :func:`claim_due_deliveries`; when given, the row changes only
        if it still carries it.
    note
        Kept in ``last_error`` (e.g. a C-STORE warning status such as 0xB000); ``None``
        clears it.
    now
        The time recorded as ``sent_at``.

    Returns
    -------
    bool
        Whether the row changed (``False``: the claim was lost).
    """
    now = now or utcnow()
    return _fenced_update(
        session,
        delivery_id,
        claimed_until,
        {
            "state": DeliveryState.sent,
            "sent_at": now,
            "next_attempt_at": None,
            "last_error": _clip(note) if note else None,
        },
        outcome="sent",
    )


def mark_retry(
    session: Session,
    delivery_id: int,
    *,
    error: str,
    next_attempt_at: datetime,
    claimed_until: datetime | None = None,
) -> bool:
    """Record a transient failure: stay ``pending``, due again at ``next_attempt_at``. Commits.

    ``error`` must hold no patient data. Returns whether the row changed.
    """
    return _fenced_update(
        session,
        delivery_id,
        claimed_until,
        {"next_attempt_at": next_attempt_at, "last_error": _clip(error)},
        outcome="retry",
    )


def mark_failed(
    session: Session,
    delivery_id: int,
    *,
    error: str,
    claimed_until: datetime | None = None,
    permanent: bool = False,
) -> bool:
    """Record a final failure: ``failed`` with the reason (no patient data). Commits.

    ``permanent``: retrying cannot fix it (the peer refused the data set, the SR file is
    gone); such rows are never re-queued by :func:`node.db.deliveries.requeue_failed`.
    Otherwise the retry horizon (or attempt cap) ran out while the destination was
    unreachable.

    A draft's HL7 result that failed for good (the RIS refused the ORU^R01, or its file was
    gone) at its only attempt, queued once (none may have been filed), replaces nothing for
    the order: the HL7 withdrawals of the study's earlier drafts
    it held back there are queued again in the same transaction, under the study's lock
    (:func:`node.db.superseded.result_failed`, audited ``delivery.restore``), unless
    another later result replaces them.

    Returns whether the row changed.
    """
    return _fenced_update(
        session,
        delivery_id,
        claimed_until,
        {
            "state": DeliveryState.failed,
            "next_attempt_at": None,
            "last_error": _clip(error),
            "permanent_failure": permanent,
        },
        outcome="failed",
        for_good=permanent,
    )


def release_claim(
    session: Session,
    delivery_id: int,
    *,
    claimed_until: datetime | None,
    now: datetime | None = None,
) -> bool:
    """Give back a claimed row that was not sent (shutdown): due now, attempt not counted.

    ``last_attempt_at`` is cleared when the released claim was the row's first (no attempt
    remains to date); after earlier attempts it keeps the released claim's start, since the
    row does not hold the previous attempt's.
    """
    now = now or utcnow()
    return _fenced_update(
        session,
        delivery_id,
        claimed_until,
        {
            "next_attempt_at": now,
            "attempts": case((Delivery.attempts > 0, Delivery.attempts - 1), else_=0),
            # SET expressions see the row's values before the update (SQLite, PostgreSQL)
            "last_attempt_at": case((Delivery.attempts > 1, Delivery.last_attempt_at), else_=None),
        },
        outcome="released",
    )
