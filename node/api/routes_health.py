"""``/health`` (live, no auth), ``/ready`` and ``/metrics`` (viewer token).

``/ready`` and ``/metrics`` need a viewer token, like everything but ``/health``: the
readiness answer names the model and the spool, and metrics reveal workload. Prometheus
sends the token with ``authorization: {credentials: ...}`` in its scrape config; a
Kubernetes readiness probe can use an ``exec`` probe with ``curl -H`` or ``/health``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from node import metrics
from node.api.deps import AUTH_ERRORS, Ctx, Viewer
from node.services.health import readiness

__all__ = ["router"]

router = APIRouter(tags=["health"])
# viewer is the weakest role: no 403
_AUTH: dict[int | str, dict[str, Any]] = {code: AUTH_ERRORS[code] for code in (401, 429)}


@router.get("/health", summary="Liveness (no authentication)")
def health() -> dict[str, str]:
    """The process answers HTTP. Says nothing else."""
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness: model warmed up, database and spool reachable (viewer)",
    responses={**_AUTH, 503: {"description": "not ready; the reasons are in the body"}},
)
def ready(ctx: Ctx, _p: Viewer) -> JSONResponse:
    """200 when ready, else 503 with a reason per failing check."""
    ok, checks = readiness(ctx)
    return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (viewer)",
    response_class=Response,
    responses={**_AUTH, 200: {"content": {"text/plain": {}}}},
)
def metrics_endpoint(ctx: Ctx, _p: Viewer) -> Response:
    """Exposition text: process metrics and database gauges (see ``node.metrics``)."""
    s = ctx.settings
    quality = metrics.QualitySettings(
        s.agreement_window, s.agreement_alert_threshold, s.agreement_min_pairs
    )
    return Response(metrics.render(ctx.read_sessions, quality), media_type=metrics.CONTENT_TYPE)
