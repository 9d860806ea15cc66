"""Queries of delivery: one ``deliveries`` row per (job, destination, object), retried.

Life of a row: ``pending`` -> ``sent`` | ``failed``; an admin re-send (or a re-run of the job)
brings it back to ``pending``; withdrawing the draft moves the rows not yet sent to
``cancelled`` (:func:`withdraw_job`). A sender *claims* due rows (``next_attempt_at <= now``): the
claim increments ``attempts`` and moves ``next_attempt_at`` forward by a short lease, so no
other sender takes the row while it is being sent (PostgreSQL: ``SELECT ... FOR UPDATE SKIP
LOCKED``; SQLite: the ``BEGIN IMMEDIATE`` transaction serializes claims). The lease end is
also the claim's fencing token: :func:`mark_sent`, :func:`mark_retry` and :func:`mark_failed`
given ``claimed_until`` change the row only while it still carries that value, so the result
of a send that outlived its lease, or of a row re-queued meanwhile, is ignored instead of
overwriting newer state. If a sender dies, the lease passes and the row is sent again.

Every function that changes state commits its own transaction (as in
:mod:`node.db.repository`). Error texts stored here name destinations and UIDs only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from integration.destinations import (
    Destination,
    DicomDestination,
    FhirDestination,
    Hl7Destination,
    StowDestination,
    parse_destination,
)
from node.db.jobs import JobNotFound
from node.db.models import (
    AuditLog,
    Delivery,
    DeliveryKind,
    DeliveryObject,
    DeliveryState,
    Job,
    utcnow,
)
from node.db.tx import in_transaction

__all__ = [
    "DestinationLike",
    "Outbound",
    "claim_due_deliveries",
    "destination_kind",
    "enqueue_deliveries",
    "failed_destinations",
    "mark_failed",
    "mark_retry",
    "mark_sent",
    "release_claim",
    "requeue_failed",
    "resend",
]

log = logging.getLogger(__name__)

DestinationLike = Destination | str
_MAX_ERROR = 2000  # keep stored error texts bounded


_KINDS = {
    DicomDestination: DeliveryKind.dimse,
    StowDestination: DeliveryKind.stow,
    Hl7Destination: DeliveryKind.hl7,
    FhirDestination: DeliveryKind.fhir,
}


def _normalise(dest: DestinationLike) -> tuple[str, DeliveryKind]:
    """The canonical destination string and its kind (see :mod:`integration.destinations`)."""
    parsed = parse_destination(dest.strip()) if isinstance(dest, str) else dest
    kind = _KINDS.get(type(parsed))
    if kind is None:
        raise TypeError(f"not a delivery destination: {type(dest).__name__}")
    return str(parsed), kind


def destination_kind(dest: DestinationLike) -> DeliveryKind:
    """The protocol of ``dest``: DIMSE C-STORE, STOW-RS, HL7 MLLP or FHIR."""
    return _normalise(dest)[1]


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


@dataclass(frozen=True)
class Outbound:
    """One object to send to one destination (a row of :func:`enqueue_deliveries`).

    Parameters
    ----------
    destination
        A configured destination or its text form.
    object
        What is sent (:class:`~node.db.models.DeliveryObject`).
    path
        The file sent: relative to the spool directory, or absolute.
    object_uid
        Its SOP Instance UID, MSH-10 or report identifier (logs and console).
    """

    destination: DestinationLike
    object: DeliveryObject
    path: str
    object_uid: str | None = None


def enqueue_deliveries(
    session: Session,
    *,
    job_id: int | None,
    sr_path: str | None = None,
    destinations: Sequence[DestinationLike] = (),
    items: Sequence[Outbound] = (),
    now: datetime | None = None,
) -> list[int]:
    """Queue objects for destinations: one ``pending`` row per (job, destination, object).

    Idempotent per (job, destination string, object): a re-run of the same job resets the
    existing row to ``pending`` (fresh attempts and retry horizon from ``queued_at = now``,
    due now, new file) instead of adding one, so a re-built object replaces rather than
    duplicates. The job row is locked first, so concurrent calls for one job never add two
    rows for one destination and object. Commits.

    Parameters
    ----------
    session
        A write session.
    job_id
        The job whose objects are delivered; ``None`` only for a synthetic Secondary
        Capture sent on request (never de-duplicated).
    sr_path, destinations
        Shorthand: the SR file for each of ``destinations`` (object ``sr``).
    items
        The objects and their destinations (:class:`Outbound`).
    now
        The current time (tests).

    Returns
    -------
    list[int]
        The delivery ids, in the order given (duplicates collapsed).

    Raises
    ------
    JobNotFound
        No job with that id.
    ValueError
        An empty file path, or a destination text of no known form.
    """
    wanted_items = list(items)
    if destinations:
        if not sr_path:
            raise ValueError("sr_path: the SR file path must not be empty")
        wanted_items += [Outbound(d, DeliveryObject.sr, sr_path) for d in destinations]
    wanted: dict[tuple[str, DeliveryObject], tuple[DeliveryKind, Outbound]] = {}
    for item in wanted_items:
        if not item.path:
            raise ValueError("path: the file to send must not be empty")
        text, kind = _normalise(item.destination)
        wanted.setdefault((text, item.object), (kind, item))
    now = now or utcnow()

    def work() -> list[int]:
        existing: dict[tuple[str, DeliveryObject], Delivery] = {}
        if job_id is not None:
            job = session.scalars(select(Job.id).where(Job.id == job_id).with_for_update()).first()
            if job is None:
                raise JobNotFound(f"job {job_id} does not exist")
            existing = {
                (d.destination, d.object): d
                for d in session.scalars(
                    select(Delivery)
                    .where(Delivery.job_id == job_id)
                    .order_by(Delivery.id)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                )
            }
        ids: list[int] = []
        for (text, obj), (kind, item) in wanted.items():
            row = existing.get((text, obj))
            if row is None:
                row = Delivery(job_id=job_id, destination=text, object=obj, created_at=now)
                session.add(row)
            row.kind = kind
            row.state = DeliveryState.pending
            row.attempts = 0
            row.next_attempt_at = now
            row.queued_at = now
            row.permanent_failure = False
            row.last_error = None
            row.sent_at = None
            row.sr_path = item.path
            row.object_uid = item.object_uid
            session.flush()
            ids.append(row.id)
        return ids

    ids = in_transaction(session, work)
    log.info(
        "job %s: %d object(s) queued: %s",
        job_id,
        len(ids),
        ", ".join(f"{obj.value} to {text}" for text, obj in wanted),
    )
    return ids


def claim_due_deliveries(
    session: Session,
    *,
    now: datetime | None = None,
    limit: int = 8,
    lease_seconds: float = 120.0,
    owner: str | None = None,
) -> list[Delivery]:
    """Claim up to ``limit`` pending deliveries that are due, oldest first.

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
                .where(
                    Delivery.state == DeliveryState.pending,
                    or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
                )
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


def _fenced_update(
    session: Session,
    delivery_id: int,
    claimed_until: datetime | None,
    values: dict[str, Any],
) -> bool:
    conditions = [Delivery.id == delivery_id, Delivery.state == DeliveryState.pending]
    if claimed_until is not None:
        conditions.append(Delivery.next_attempt_at == claimed_until)

    def work() -> bool:
        res = session.execute(
            update(Delivery)
            .where(*conditions)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(res, "rowcount", 0))

    changed = in_transaction(session, work)
    if not changed:
        log.warning(
            "delivery %s: claim no longer held (re-queued or lease passed); result not recorded",
            delivery_id,
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
    gone); such rows are never re-queued by :func:`requeue_failed`. Otherwise the retry
    horizon (or attempt cap) ran out while the destination was unreachable.

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
    )


def resend(session: Session, job_id: int, *, actor: str, now: datetime | None = None) -> list[int]:
    """Re-send a job's objects to all their destinations (admin action, audited). Commits.

    Every delivery row of the job goes back to ``pending``, due now, with fresh attempts
    and a fresh retry horizon; the file recorded for each row is sent again (same SOP
    Instance UID: the PACS replaces it). Rows ``cancelled`` by a withdrawal stay so; of a
    withdrawn job only the withdrawals are re-sent.

    Returns
    -------
    list[int]
        The delivery ids re-queued (empty when the job never had anything queued).

    Raises
    ------
    JobNotFound
        No job with that id.
    """
    now = now or utcnow()

    def work() -> list[int]:
        job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist")
        rows = [
            r
            for r in session.scalars(
                select(Delivery)
                .where(Delivery.job_id == job_id, Delivery.state != DeliveryState.cancelled)
                .order_by(Delivery.id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
            if job.withdrawn_at is None or r.object is DeliveryObject.withdrawal
        ]
        before = {str(r.id): r.state.value for r in rows}
        for row in rows:
            row.state = DeliveryState.pending
            row.attempts = 0
            row.next_attempt_at = now
            row.queued_at = now
            row.permanent_failure = False
            row.last_error = None
            row.sent_at = None
        session.add(
            AuditLog(
                at=now,
                actor=actor,
                action="job.resend",
                target=f"job:{job_id}",
                detail={"deliveries": before},
            )
        )
        return [r.id for r in rows]

    return in_transaction(session, work)


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
        rows = list(
            session.scalars(
                select(Delivery)
                .where(
                    Delivery.destination == destination,
                    Delivery.state == DeliveryState.failed,
                    Delivery.permanent_failure.is_(False),
                )
                .order_by(Delivery.id)
                .with_for_update(skip_locked=True)
                .execution_options(populate_existing=True)
            )
        )
        for row in rows:
            row.state = DeliveryState.pending
            row.attempts = 0
            row.next_attempt_at = now
            row.queued_at = now
            row.last_error = None
            row.sent_at = None
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
