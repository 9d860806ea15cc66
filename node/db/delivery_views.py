"""Read views of deliveries: listing and counting them, and each destination's health."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.models import Delivery, DeliveryState, Job, Study
from node.db.queries import count_by_state, page
from node.db.read_models import read_model
from node.db.views import DeliveryRow, delivery_row
from node.jsonable import to_jsonable

__all__ = [
    "DestinationFailures",
    "DestinationHealth",
    "FailedDelivery",
    "delivery_counts",
    "destination_health",
    "failed_deliveries",
    "failures_by_destination",
    "list_deliveries",
]


def list_deliveries(
    session: Session,
    *,
    job_id: int | None = None,
    state: DeliveryState | str | None = None,
    limit: int = 100,
) -> list[DeliveryRow]:
    """Deliveries, newest first, optionally of one job and/or in one state."""
    stmt = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
    if job_id is not None:
        stmt = stmt.where(Delivery.job_id == job_id)
    if state is not None:
        stmt = stmt.where(Delivery.state == DeliveryState(state))
    return [delivery_row(d) for d in session.scalars(stmt)]


def delivery_counts(session: Session) -> dict[str, int]:
    """Deliveries by state, every state present (zero included)."""
    return count_by_state(session, Delivery.state, DeliveryState)


@dataclass(frozen=True)
class DestinationHealth:
    """Delivery history of one destination.

    ``last_success_at`` is the newest ``sent_at``. The schema keeps no failure time, so the
    newest unsent delivery that has an error is described by its state (``pending``: still
    retrying, due again at ``retry_at``; ``failed``: given up), its error and when it was
    queued. A delivery ``cancelled`` (its draft withdrawn or superseded) is not the
    destination's failure.
    """

    destination: str
    last_success_at: datetime | None
    failure_state: str | None
    failure_queued_at: datetime | None
    retry_at: datetime | None
    last_error: str | None
    counts: dict[str, int]


def destination_health(session: Session, destinations: list[str]) -> dict[str, DestinationHealth]:
    """Health of each destination, keyed by its text as the delivery rows store it.

    Three grouped queries whatever the number of destinations: the counts by state, the newest
    ``sent_at`` and the newest ``pending`` or ``failed`` delivery with an error, each per
    destination.
    """
    if not destinations:
        return {}
    ours = Delivery.destination.in_(destinations)
    counts = {d: {s.value: 0 for s in DeliveryState} for d in destinations}
    for dest, state, n in session.execute(
        select(Delivery.destination, Delivery.state, func.count())
        .where(ours)
        .group_by(Delivery.destination, Delivery.state)
    ):
        counts[dest][DeliveryState(state).value] = int(n)
    last_ok = {
        dest: at
        for dest, at in session.execute(
            select(Delivery.destination, func.max(Delivery.sent_at))
            .where(ours, Delivery.state == DeliveryState.sent)
            .group_by(Delivery.destination)
        )
    }
    unsent = Delivery.state.in_([DeliveryState.pending, DeliveryState.failed])
    newest_failure = (
        select(func.max(Delivery.id))
        .where(ours, Delivery.last_error.is_not(None), unsent)
        .group_by(Delivery.destination)
    )
    failed = {
        d.destination: d
        for d in session.scalars(select(Delivery).where(Delivery.id.in_(newest_failure)))
    }
    out: dict[str, DestinationHealth] = {}
    for dest in destinations:
        f = failed.get(dest)
        out[dest] = DestinationHealth(
            destination=dest,
            last_success_at=last_ok.get(dest),
            failure_state=None if f is None else f.state.value,
            failure_queued_at=None if f is None else f.created_at,
            retry_at=None if f is None or f.state != DeliveryState.pending else f.next_attempt_at,
            last_error=None if f is None else f.last_error,
            counts=counts[dest],
        )
    return out


_STUDY_IDENTITY = ("patient_name", "patient_id", "accession_number")


@dataclass(frozen=True)
class FailedDelivery:
    """A delivery that failed for good, with its job's study identity (patient data: pages
    and API only, never logged). ``permanent``: the receiver refused it (0xA9xx/0xCxxx,
    HTTP 4xx), so retrying unchanged will fail again."""

    id: int
    job_id: int | None
    destination: str
    object: str
    object_uid: str | None
    attempts: int
    last_attempt_at: datetime | None
    last_error: str | None
    permanent: bool
    study_uid: str | None
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (datetimes as ISO 8601)."""
        return dict(to_jsonable(self))


def failed_deliveries(
    session: Session, *, destination: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[FailedDelivery], int]:
    """``failed`` deliveries (of one destination), last attempt newest first, and how many."""
    where: list[Any] = [Delivery.state == DeliveryState.failed]
    if destination is not None:
        where.append(Delivery.destination == destination)
    rows, total = page(
        session,
        select(Delivery, Study)
        .outerjoin(Job, Job.id == Delivery.job_id)
        .outerjoin(Study, Study.id == Job.study_id)
        .where(*where),
        order_by=(Delivery.last_attempt_at.desc(), Delivery.id.desc()),
        limit=limit,
        offset=offset,
    )
    return [
        read_model(
            FailedDelivery,
            d,
            permanent=bool(d.permanent_failure),
            study_uid=None if st is None else st.study_instance_uid,
            **{name: None if st is None else getattr(st, name) for name in _STUDY_IDENTITY},
        )
        for d, st in rows
    ], total


@dataclass(frozen=True)
class DestinationFailures:
    """How many deliveries to one destination failed for good, and the newest attempt."""

    destination: str
    failed: int
    last_attempt_at: datetime | None


def failures_by_destination(session: Session) -> list[DestinationFailures]:
    """Destinations with ``failed`` deliveries, most failures first."""
    rows = session.execute(
        select(Delivery.destination, func.count(Delivery.id), func.max(Delivery.last_attempt_at))
        .where(Delivery.state == DeliveryState.failed)
        .group_by(Delivery.destination)
        .order_by(func.count(Delivery.id).desc(), Delivery.destination)
    ).all()
    return [DestinationFailures(str(d), int(n), at) for d, n, at in rows]
