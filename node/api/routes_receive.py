"""Receive log routes: the associations offered to the storage SCP, filtered and paged, and
one association with its refused instances (viewer and above).

What is logged is in ``CONFORMANCE.md`` ("Receive log"): calling and called AE titles,
address and port, TLS or not, start and end, outcome (PS3.8 7.1-7.4, 9.3.4) and the
C-STORE answers by status (PS3.4 Table B.2-1), with a row per refused request.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from node.api.deps import AUTH_ERRORS, Ctx, Limit, Offset, Viewer, utc
from node.api.schemas import ErrorOut
from node.db.models import ID_MAX
from node.db.receive_log import AssociationDetail, AssociationRow, ReceiveLogFilter
from node.services import receive_log as receive_service

__all__ = ["ReceiveLogPage", "router"]

router = APIRouter(prefix="/api/receive-log", tags=["receive log"], responses=AUTH_ERRORS)
AssociationId = Annotated[int, Path(ge=1, le=ID_MAX, description="Association id.")]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    404: {"model": ErrorOut, "description": "no such association in the receive log"},
}


class ReceiveLogPage(BaseModel):
    """A page of associations, newest first, and the number of matches."""

    total: int
    limit: int
    offset: int
    items: list[AssociationRow]


@router.get("", response_model=ReceiveLogPage, summary="List associations, newest first")
def list_associations(
    ctx: Ctx,
    _p: Viewer,
    calling_ae: Annotated[
        str | None, Query(max_length=16, description="Calling AE Title contains (any case).")
    ] = None,
    study_uid: Annotated[
        str | None,
        Query(
            max_length=64,
            description="Delivered an instance of this study or had a refused request for it.",
        ),
    ] = None,
    outcome: Annotated[Literal["open", "released", "aborted", "rejected"] | None, Query()] = None,
    since: Annotated[datetime | None, Query(description="Started at or after (UTC).")] = None,
    until: Annotated[datetime | None, Query(description="Started before (UTC).")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> ReceiveLogPage:
    """Associations matching every given filter, one page of them, with the total."""
    flt = ReceiveLogFilter(
        calling_ae=calling_ae or None,
        study_uid=study_uid or None,
        outcome=outcome,
        since=utc(since),
        until=utc(until),
        limit=limit,
        offset=offset,
    )
    rows, total = receive_service.list_associations(ctx, flt)
    return ReceiveLogPage(total=total, limit=limit, offset=offset, items=rows)


@router.get(
    "/{association_id}",
    response_model=AssociationDetail,
    responses=_NOT_FOUND,
    summary="One association with its refused instances",
)
def get_association(association_id: AssociationId, ctx: Ctx, _p: Viewer) -> AssociationDetail:
    """The association, each refused C-STORE request (UIDs, status, reason) and the Study
    Instance UIDs it delivered instances of."""
    return receive_service.detail(ctx, association_id)
