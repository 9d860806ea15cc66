"""What every route module shares: the role dependencies, the context, the error answers
of authentication (and of the routes that run the model), and the time-zone rule for query
times (a time UTC cannot hold is a 422)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Query

from node.api.auth import Principal, require_role
from node.api.context import api_context
from node.api.errors import ApiError
from node.api.schemas import ErrorOut
from node.services.context import ServiceContext

__all__ = [
    "AUTH_ERRORS",
    "MODEL_ERRORS",
    "Admin",
    "Ctx",
    "Limit",
    "Offset",
    "Operator",
    "Reviewer",
    "Viewer",
    "utc",
]

#: the error answers every authenticated route may give (OpenAPI ``responses``)
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no or invalid token"},
    403: {"model": ErrorOut, "description": "role too weak, or CSRF check failed"},
    429: {"model": ErrorOut, "description": "too many failed authentications (Retry-After)"},
}
#: the error answers of a route that runs the model (OpenAPI ``responses``)
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorOut, "description": "input the model cannot take"},
    503: {"model": ErrorOut, "description": "model not loaded (yet) or busy"},
}
Viewer = Annotated[Principal, Depends(require_role("viewer"))]
Reviewer = Annotated[Principal, Depends(require_role("reviewer"))]
Operator = Annotated[Principal, Depends(require_role("operator"))]
Admin = Annotated[Principal, Depends(require_role("admin"))]
Ctx = Annotated[ServiceContext, Depends(api_context)]
#: paging of every list route: at most ``limit`` rows after skipping ``offset``
Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many rows.")]
Offset = Annotated[int, Query(ge=0, le=10**9, description="Rows skipped first.")]


def utc(value: datetime | None) -> datetime | None:
    """A query's time as UTC: a time without zone is read as UTC.

    Raises
    ------
    ApiError
        422 for a time with an offset that puts it outside the years 1 to 9999 in UTC
        (``0001-01-01T00:00+01:00``): no column can hold it, so it is bad input, not a 500.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ApiError(
            422, f"{value.isoformat()} is outside the times UTC holds (years 1 to 9999)"
        ) from None
