"""Delivery routes: the failed deliveries, per destination, and re-sending them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, model_validator

from node.api.deps import AUTH_ERRORS, Ctx, Limit, Offset, Operator, Viewer
from node.db.delivery_views import DestinationFailures, FailedDelivery
from node.db.models import ID_MAX
from node.services import deliveries as delivery_service

__all__ = ["router"]

router = APIRouter(prefix="/api/deliveries", tags=["deliveries"], responses=AUTH_ERRORS)


class FailedPage(BaseModel):
    """A page of failed deliveries, newest attempt first, the number of matches, and the
    failures per destination."""

    total: int
    limit: int
    offset: int
    items: list[FailedDelivery]
    destinations: list[DestinationFailures]


class ResendIn(BaseModel):
    """What to re-send: the deliveries ``ids``, or every failed delivery of ``destination``."""

    ids: list[Annotated[int, Field(ge=1, le=ID_MAX)]] = Field(default_factory=list, max_length=1000)
    destination: str | None = Field(default=None, max_length=512)

    @model_validator(mode="after")
    def _one_of(self) -> ResendIn:
        if bool(self.ids) == (self.destination is not None):
            raise ValueError("give either ids or destination")
        return self


class ResendOut(BaseModel):
    """The delivery ids queued again (rows being sent or cancelled are left alone)."""

    queued: list[int]


@router.get("/failed", response_model=FailedPage, summary="Failed deliveries (viewer)")
def failed(
    ctx: Ctx,
    _p: Viewer,
    destination: Annotated[str | None, Query(max_length=512)] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> FailedPage:
    """Deliveries that failed for good, with the last attempt's time and error."""
    rows, total = delivery_service.failures(
        ctx, destination=destination, limit=limit, offset=offset
    )
    return FailedPage(
        total=total,
        limit=limit,
        offset=offset,
        items=rows,
        destinations=delivery_service.failures_by_destination(ctx),
    )


@router.post("/resend", response_model=ResendOut, summary="Re-send deliveries (operator)")
def resend(body: ResendIn, ctx: Ctx, p: Operator) -> ResendOut:
    """Queue the named deliveries, or all failed ones of a destination, again; audited
    ``delivery.resend`` per job."""
    return ResendOut(
        queued=delivery_service.resend(ctx, actor=p.actor, ids=body.ids, failed_to=body.destination)
    )
