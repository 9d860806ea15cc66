"""Read-only queries behind the web console's pages: destination health, stored studies.

They only read, through a read-only session, and never log report text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.models import Delivery, DeliveryState, Instance, Study

__all__ = ["DestinationHealth", "StudyChoice", "destination_health", "recent_studies"]


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


@dataclass(frozen=True)
class StudyChoice:
    """A stored study offered on the Try page (UIDs and counts only, no patient data)."""

    study_uid: str
    instance_count: int
    last_received_at: datetime


def recent_studies(session: Session, *, limit: int = 50) -> list[StudyChoice]:
    """The newest stored studies that still have at least one instance in the spool."""
    has_inst = select(Instance.study_id).distinct()
    rows = session.execute(
        select(Study.study_instance_uid, Study.instance_count, Study.last_received_at)
        .where(Study.id.in_(has_inst))
        .order_by(Study.last_received_at.desc())
        .limit(limit)
    ).all()
    return [StudyChoice(uid, int(n or 0), at) for uid, n, at in rows]
