"""The receive log as front ends see it: associations offered to the storage SCP (PS3.8
7.1-7.4, 9.3.4) with their C-STORE answers (PS3.4 Table B.2-1), overall or per study.

Read-only: the log is written by the SCP (:mod:`node.runtime.receive_log`) and purged by
the retention chore (``receive_log_days``). It holds AE titles, addresses, UIDs, status
codes and the node's reasons, never patient data.

Raises
------
node.services.errors.NotFound
    :func:`detail` of an association that is not (or no longer) in the log.
"""

from __future__ import annotations

from node.db import receive_log as receive_db
from node.services.context import ServiceContext
from node.services.errors import NotFound

__all__ = ["detail", "list_associations", "refused_on_page"]


def list_associations(
    ctx: ServiceContext, flt: receive_db.ReceiveLogFilter
) -> tuple[list[receive_db.AssociationRow], int]:
    """Associations matching ``flt``, newest first, and the number of matches."""
    with ctx.read_sessions() as session:
        return receive_db.list_associations(session, flt)


def detail(ctx: ServiceContext, association_id: int) -> receive_db.AssociationDetail:
    """One association with its refused instances and the studies it delivered."""
    with ctx.read_sessions() as session:
        found = receive_db.association_detail(session, association_id)
    if found is None:
        raise NotFound(f"no association {association_id} in the receive log")
    return found


def refused_on_page(
    ctx: ServiceContext, association_ids: list[int]
) -> dict[int, list[receive_db.RefusedRow]]:
    """The refused instances of the associations of one page (the first 20 of each)."""
    with ctx.read_sessions() as session:
        return receive_db.refused_by_association(session, association_ids)
