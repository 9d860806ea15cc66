"""Queries of delivery: one ``deliveries`` row per (job, destination, object), retried.

Life of a row: ``pending`` -> ``sent`` | ``failed``; an admin re-send (:func:`resend`), a
re-run of the job (:func:`enqueue_deliveries`) or a destination that answers again
(:func:`requeue_failed`; :mod:`node.db.delivery_resends`, re-exported here) brings it back
to ``pending``; a re-run cancels its earlier run's
rows it does not queue again (:func:`enqueue_deliveries`); withdrawing the draft moves the rows
not yet sent to ``cancelled`` (:func:`node.db.withdrawals.withdraw_job`), and so do a
later job of the study that queued its draft to the same destination, once it is done
(:func:`node.db.superseded.supersede`), and the job's own end as ``failed`` or
``cancelled`` (:func:`node.db.jobs.transition`). Senders claim due rows of done jobs
under a lease that is also a fencing token, and record each send's outcome
(:mod:`node.db.delivery_claims`: :func:`claim_due_deliveries`, :func:`mark_sent`,
:func:`mark_retry`, :func:`mark_failed`, :func:`release_claim`, re-exported here).

Every function that changes state commits its own transaction
(:func:`node.db.tx.in_transaction`). Error texts stored here name destinations and UIDs only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from integration.destinations import (
    Destination,
    DicomDestination,
    FhirDestination,
    Hl7Destination,
    StowDestination,
    parse_destination,
)
from node.db.delivery_claims import (
    claim_due_deliveries,
    mark_failed,
    mark_retry,
    mark_sent,
    release_claim,
)
from node.db.delivery_resends import (
    failed_destinations,
    requeue_failed,
    resend,
    resend_deliveries,
)
from node.db.jobs import lock_job, owned_running
from node.db.models import (
    Delivery,
    DeliveryKind,
    DeliveryObject,
    JobState,
    utcnow,
)
from node.db.queries import locked_deliveries
from node.db.superseded import (
    hold_order_withdrawals,
    later_drafts,
    later_withdrawn,
    lock_study_of,
    log_superseded,
)
from node.db.superseded import supersede as supersede_older
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
    "resend_deliveries",
]

log = logging.getLogger(__name__)

DestinationLike = Destination | str


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
    supersede: bool = False,
    owner: str | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Queue objects for destinations: one ``pending`` row per (job, destination, object).

    Idempotent per (job, destination string, object): a re-run of the same job resets the
    existing row to ``pending`` (fresh attempts and retry horizon from ``queued_at = now``,
    due now, new file) instead of adding one, so a re-built object replaces rather than
    duplicates. The job row is locked first, so concurrent calls for one job never add two
    rows for one destination and object. A job's rows are sent only once the job is done
    (:func:`node.db.delivery_claims.claim_due_deliveries`). With ``supersede``, the study's
    lock is taken first, so that two jobs of the study queue one after the other, and the
    unsent rows of the study's older drafts are cancelled
    (:func:`node.db.superseded.supersede`) here when the job is done already, else in the
    transaction that marks it done (:func:`node.db.withdrawals.finish_job`). An HL7
    withdrawal to a destination where a later done draft of the study replaces the order's
    result, or will, is held back, ``cancelled``, under the study's lock
    (:func:`node.db.superseded.hold_order_withdrawals`). Commits.

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
    supersede
        The objects are the job's draft of its study: once the job is done, the draft rows
        of the study's earlier jobs not yet sent to these destinations are cancelled, and so
        are the job's own to a destination a later done job has queued its draft to
        (audited ``delivery.supersede``), so an older draft never reaches a destination
        after the newer one. Nothing is queued
        when the study's newest later draft is withdrawn
        (:func:`node.db.superseded.later_withdrawn`): this draft goes with it as the job
        finishes (:func:`node.db.withdrawals.finish_job`). Ignored without ``job_id``.
    owner
        The worker that holds the running job, whose run queues its draft's objects:
        nothing is queued unless it still does, so that a job cancelled or failed meanwhile
        queues nothing; and the job's draft rows of an earlier run not queued again (its
        routing chose other destinations, or none) are cancelled, not sent with an older
        file once the job is done ("cancelled: not queued again by the job's last run").
    now
        The current time (tests).

    Returns
    -------
    list[int]
        The job's rows queued, in the order given (duplicates collapsed), including one then
        cancelled as superseded by a later job's draft, or held back; a row left as it was
        (sent or attempted before a later draft) and other jobs' cancelled rows are not in it.

    Raises
    ------
    JobNotFound
        No job with that id.
    LeaseLost
        With ``owner``: the job is no longer running under it.
    ValueError
        An empty file path, or a destination text of no known form.
    """
    wanted = _wanted(items, sr_path, destinations)
    now = now or utcnow()

    superseded: dict[int, list[int]] = {}
    held: dict[int, list[int]] = {}
    orders = any(
        obj is DeliveryObject.withdrawal and kind is DeliveryKind.hl7
        for (_text, obj), (kind, _item) in wanted.items()
    )
    withdrawn_with: list[int] = []
    dropped: list[int] = []

    def work() -> list[int]:
        existing: dict[tuple[str, DeliveryObject], Delivery] = {}
        done = False
        if job_id is not None:
            if supersede or orders:  # one study's drafts and withdrawals take turns
                lock_study_of(session, job_id)
            if supersede:
                later = later_withdrawn(session, job_id)
                if later is not None:  # this draft is withdrawn with it as the job finishes
                    withdrawn_with.append(later[0])
                    return []
            job = owned_running(session, job_id, owner) if owner else lock_job(session, job_id)
            done = job.state is JobState.done
            rows = locked_deliveries(session, Delivery.job_id == job_id)
            existing = {(d.destination, d.object): d for d in rows}
        newer: dict[str, int] = {}
        if supersede and job_id is not None and wanted:
            newer = later_drafts(session, job_id, {t for t, _o in wanted})
        queued = _queue_rows(session, job_id, wanted, existing, newer, now)
        if orders and job_id is not None:
            held.update(hold_order_withdrawals(session, job_id, queued, now))
        if owner:  # an earlier run's rows this run did not queue again
            dropped.extend(_cancel_not_queued_again(existing, wanted))
        if supersede and job_id is not None and done:
            superseded.update(supersede_older(session, job_id, now))
        return [row.id for row in queued]

    ids = in_transaction(session, work)
    if withdrawn_with:
        log.info(
            "job %s: nothing queued: the study's later draft, job %s's, was withdrawn and "
            "takes this one with it",
            job_id,
            withdrawn_with[0],
        )
        return ids
    if dropped:
        log.info(
            "job %s: %d row(s) of an earlier run not queued again cancelled", job_id, len(dropped)
        )
    if wanted:
        _log_queued(job_id, ids, wanted, superseded, held)
    return ids


def _queue_rows(
    session: Session,
    job_id: int | None,
    wanted: dict[tuple[str, DeliveryObject], tuple[DeliveryKind, Outbound]],
    existing: dict[tuple[str, DeliveryObject], Delivery],
    newer: dict[str, int],
    now: datetime,
) -> list[Delivery]:
    """Queue each wanted (destination, object) of the job: its existing row (locked) set
    ``pending`` again with the new file (:meth:`Delivery.requeue`), or a new row. A row that
    may have reached a destination a later draft of the study (``newer``) went to is left
    as it is (a withdrawal needs to know it went); the rows queued, flushed."""
    queued: list[Delivery] = []
    for (text, obj), (kind, item) in wanted.items():
        row = existing.get((text, obj))
        if row is not None and text in newer and row.may_have_reached:
            continue  # not reset, only cancelled if unsent (node.db.superseded)
        if row is None:
            row = Delivery(job_id=job_id, destination=text, object=obj, created_at=now)
            session.add(row)
        row.kind = kind
        row.requeue(now)
        row.sr_path = item.path
        row.object_uid = item.object_uid
        session.flush()
        queued.append(row)
    return queued


def _cancel_not_queued_again(
    existing: dict[tuple[str, DeliveryObject], Delivery],
    wanted: dict[tuple[str, DeliveryObject], tuple[DeliveryKind, Outbound]],
) -> list[int]:
    """Cancel the job's unsent draft rows of an earlier run that this run did not queue
    again (its routing chose other destinations, or none), so that none goes out with an
    older file once the job is done; withdrawals are left. The ids cancelled."""
    dropped: list[int] = []
    for row in existing.values():
        stale = (row.destination, row.object) not in wanted
        if stale and row.object is not DeliveryObject.withdrawal and row.unsent:
            row.cancel("cancelled: not queued again by the job's last run")
            dropped.append(row.id)
    return dropped


def _log_queued(
    job_id: int | None,
    ids: list[int],
    wanted: dict[tuple[str, DeliveryObject], tuple[DeliveryKind, Outbound]],
    superseded: dict[int, list[int]],
    held: dict[int, list[int]],
) -> None:
    """The log lines of an enqueue that queued ``wanted``: what, and what it superseded
    and held back (destinations, objects and job ids only)."""
    log.info(
        "job %s: %d object(s) queued: %s",
        job_id,
        len(ids),
        ", ".join(f"{obj.value} to {text}" for text, obj in wanted),
    )
    if job_id is not None:
        log_superseded(job_id, superseded)
    for later, rows in held.items():
        log.info(
            "job %s: %d HL7 withdrawal(s) held back: job %s's result replaces the order's",
            job_id,
            len(rows),
            later,
        )


def _wanted(
    items: Sequence[Outbound], sr_path: str | None, destinations: Sequence[DestinationLike]
) -> dict[tuple[str, DeliveryObject], tuple[DeliveryKind, Outbound]]:
    """The rows :func:`enqueue_deliveries` is asked for, by (destination text, object); the
    first of duplicates wins. Raises ``ValueError`` for an empty path or an unknown form."""
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
    return wanted
