"""Deliveries as front ends see them: the failures, per destination, and re-sending them.

Re-sending is audited by the repository in the same transaction (``delivery.resend``,
target the job); the senders are woken at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from node.db import deliveries as deliveries_db
from node.db import delivery_views
from node.services.context import ServiceContext
from node.services.errors import InvalidInput

__all__ = ["failures", "failures_by_destination", "resend"]


def failures(
    ctx: ServiceContext, *, destination: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[delivery_views.FailedDelivery], int]:
    """Deliveries that failed for good (of one destination), newest attempt first, and
    how many there are."""
    with ctx.read_sessions() as session:
        return delivery_views.failed_deliveries(
            session, destination=destination, limit=limit, offset=offset
        )


def failures_by_destination(ctx: ServiceContext) -> list[delivery_views.DestinationFailures]:
    """Each destination with failed deliveries: how many, and the newest attempt."""
    with ctx.read_sessions() as session:
        return delivery_views.failures_by_destination(session)


def resend(
    ctx: ServiceContext,
    *,
    actor: str,
    ids: Sequence[int] = (),
    failed_to: str | None = None,
) -> list[int]:
    """Re-send the deliveries ``ids``, or every failed one of destination ``failed_to``.

    Returns the delivery ids queued again (rows being sent or cancelled are left alone).

    Raises
    ------
    InvalidInput
        Neither or both of ``ids`` and ``failed_to`` given.
    """
    from node.runtime.delivery import wake_senders

    if bool(ids) == (failed_to is not None):
        raise InvalidInput("name either the deliveries or one destination")
    with ctx.write_sessions() as session:
        queued = deliveries_db.resend_deliveries(session, actor=actor, ids=ids, failed_to=failed_to)
    if queued:
        wake_senders()
    return queued
