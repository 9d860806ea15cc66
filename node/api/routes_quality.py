"""Quality routes: draft/final concordance over time, and the per-pair export (viewer)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from node.api.deps import AUTH_ERRORS, Ctx, Viewer, utc
from node.services import quality

__all__ = ["router"]

_ERRORS = AUTH_ERRORS
router = APIRouter(prefix="/api/quality", tags=["quality"], responses=_ERRORS)
Since = Annotated[datetime | None, Query(description="Final received at or after (UTC).")]
Until = Annotated[datetime | None, Query(description="Final received before (UTC).")]
Version = Annotated[str | None, Query(max_length=64, description="Only this model version.")]


@router.get("/summary", summary="Draft/final concordance, per model version and over time")
def summary(
    ctx: Ctx,
    _p: Viewer,
    since: Since = None,
    until: Until = None,
    model_version: Version = None,
    window_days: Annotated[int, Query(ge=1, le=366, description="Width of a window.")] = 7,
) -> dict[str, Any]:
    """Per observation agreement, Cohen's kappa and F1, micro/macro F1, BLEU-4, ROUGE-L,
    turnaround and significant discrepancies: overall, per model version, and per model
    version and window; the rolling-agreement alert. No report text."""
    return quality.summary(
        ctx,
        since=utc(since),
        until=utc(until),
        model_version=model_version,
        window=timedelta(days=window_days),
    )


@router.get(
    "/pairs",
    summary="Export the per-pair labels and scores (CSV or JSON) for a registry",
    responses={200: {"content": {"text/csv": {}, "application/json": {}}}},
)
def pairs(
    ctx: Ctx,
    _p: Viewer,
    since: Since = None,
    until: Until = None,
    model_version: Version = None,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> Response:
    """One row per scored pair: ids, Study Instance UID, model, scores and the 14 labels of
    draft and final (columns in :data:`node.services.quality.EXPORT_COLUMNS`)."""
    rows = quality.export_rows(ctx, since=utc(since), until=utc(until), model_version=model_version)
    headers = {"Cache-Control": "no-store"}
    if format == "csv":
        headers["Content-Disposition"] = 'attachment; filename="cxr-node-pairs.csv"'
        return Response(quality.export_csv(rows), media_type="text/csv", headers=headers)
    return JSONResponse(rows, headers=headers)
