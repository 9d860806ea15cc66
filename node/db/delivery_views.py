"""Read views of deliveries: listing and counting them, and each destination's health."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.models import Delivery, DeliveryState

__all__ = [
    "DeliverySummary",
    "DestinationHealth",
    "delivery_counts",
    "destination_health",
    "list_deliveries",
]


@dataclass(frozen=True)
class DeliverySummary:
    """One delivery as shown by the API and the CLI."""

    id: int
    job_id: int | None
    destination: str
    kind: str
    object: str
    object_uid: str | None
    state: str
    attempts: int
    next_attempt_at: str | None
    last_attempt_at: str | None
    sent_at: str | None
    last_error: str | None
    sr_path: str | None
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


def list_deliveries(
    session: Session,
    *,
    job_id: int | None = None,
    state: DeliveryState | str | None = None,
    limit: int = 100,
) -> list[DeliverySummary]:
    """Deliveries, newest first, optionally of one job and/or in one state."""
    stmt = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
    if job_id is not None:
        stmt = stmt.where(Delivery.job_id == job_id)
    if state is not None:
        stmt = stmt.where(Delivery.state == DeliveryState(state))
    return [
        DeliverySummary(
            id=d.id,
            job_id=d.job_id,
            destination=d.destination,
            kind=d.kind.value,
            object=d.object.value,
            object_uid=d.object_uid,
            state=d.state.value,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at.isoformat() if d.next_attempt_at else None,
            last_attempt_at=d.last_attempt_at.isoformat() if d.last_attempt_at else None,
            sent_at=d.sent_at.isoformat() if d.sent_at else None,
            last_error=d.last_error,
            sr_path=d.sr_path,
            created_at=d.created_at.isoformat(),
        )
        for d in session.scalars(stmt)
    ]


def delivery_counts(session: Session) -> dict[str, int]:
    """Deliveries by state, every state present (zero included)."""
    out = {s.value: 0 for s in DeliveryState}
    for state, n in session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)):
        out[DeliveryState(state).value] = int(n)
    return out


@dataclass(frozen=True)
class DestinationHealth:
    """Delivery history of one destination.

    ``last_success_at`` is the newest ``sent_at``. The schema keeps no failure time, so the
    newest delivery that has an error is described by its state (``pending``: still retrying,
    due again at ``retry_at``; ``failed``: given up), its error and when it was queued.
    """

    destination: str
    last_success_at: datetime | None
    failure_state: str | None
    failure_queued_at: datetime | None
    retry_at: datetime | None
    last_error: str | None
    counts: dict[str, int]


def destination_health(session: Session, destinations: list[str]) -> dict[str, DestinationHealth]:
    """Health of each destination, keyed by its text as the delivery rows store it."""
    out: dict[str, DestinationHealth] = {}
    for dest in destinations:
        last_ok = session.scalar(
            select(func.max(Delivery.sent_at)).where(
                Delivery.destination == dest, Delivery.state == DeliveryState.sent
            )
        )
        failed = session.execute(
            select(
                Delivery.state, Delivery.last_error, Delivery.next_attempt_at, Delivery.created_at
            )
            .where(
                Delivery.destination == dest,
                Delivery.last_error.is_not(None),
                Delivery.state != DeliveryState.sent,
            )
            .order_by(Delivery.id.desc())
            .limit(1)
        ).first()
        counts = {s.value: 0 for s in DeliveryState}
        for state, n in session.execute(
            select(Delivery.state, func.count())
            .where(Delivery.destination == dest)
            .group_by(Delivery.state)
        ):
            counts[DeliveryState(state).value] = int(n)
        out[dest] = DestinationHealth(
            destination=dest,
            last_success_at=last_ok,
            failure_state=None if failed is None else DeliveryState(failed[0]).value,
            failure_queued_at=None if failed is None else failed[3],
            retry_at=None if failed is None or failed[0] != DeliveryState.pending else failed[2],
            last_error=None if failed is None else failed[1],
            counts=counts,
        )
    return out
