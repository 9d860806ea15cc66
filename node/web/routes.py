"""The web console's smaller pages: static files, login, destinations, quality,
try-the-model, and the frame's summary poll. The other pages live in one module each
(``job_pages``, ``delivery_pages``, ``receive_pages``, ``rules_pages``, ``system_pages``,
``chat_pages``), combined in :mod:`node.web`; all render through :mod:`node.web.frame`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from node.services import jobs as job_service
from node.services import quality
from node.web import auth, charts, frame

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


# --- static files ---------------------------------------------------------------------------


@router.get("/static/{name}", name="web_static")
def static(name: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]+$")]) -> Response:
    """Serve the console's CSS and JavaScript (only files lying in ``static/``)."""
    path = frame.STATIC_DIR / name
    media = frame.STATIC_TYPES.get(path.suffix)
    if media is None or not path.is_file() or path.parent != frame.STATIC_DIR:
        raise HTTPException(status_code=404, detail="no such static file")
    return FileResponse(
        path,
        media_type=media,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


# --- login ------------------------------------------------------------------------------------


@router.get("/login", name="web_login", response_class=HTMLResponse)
def login_page(request: Request, user: frame.PageUser) -> Response:
    """The login page: paste a token; ``console.js`` posts it to ``POST /api/session``."""
    if user is not None:
        return RedirectResponse(str(request.app.url_path_for("web_queue")), status_code=303)
    return frame.render(request, "login.html", page="login", title="Log in", user=None)


# --- pages ------------------------------------------------------------------------------------


@router.get("/destinations", name="web_destinations", response_class=HTMLResponse)
def destinations_page(request: Request, user: frame.PageUser) -> Response:
    """Configured destinations with their delivery history (last success / failure)."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    settings = ctx.settings
    # delivery rows name a destination by str(d) (node.db.deliveries)
    keys = [str(d) for d in settings.destinations]
    health = job_service.destination_health(ctx, keys)
    rows = [
        {"text": k, "kind": d.kind, "health": health[k]}
        for k, d in zip(keys, settings.destinations, strict=True)
    ]
    return frame.render(
        request,
        "destinations.html",
        page="destinations",
        title="Destinations",
        user=user,
        destinations=rows,
        can_operate=user.has("operator"),
    )


@router.get("/quality", name="web_quality", response_class=HTMLResponse)
def quality_page(
    request: Request,
    user: frame.PageUser,
    model_version: Annotated[str | None, Query(max_length=64)] = None,
    window_days: Annotated[int, Query(ge=1, le=366)] = 7,
) -> Response:
    """Draft/final concordance: agreement over time per model version and per critical
    observation, volume, turnaround, the discrepancy list, the export links."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    data = quality.summary(
        ctx, model_version=model_version or None, window=timedelta(days=window_days)
    )
    return frame.render(
        request,
        "quality.html",
        page="quality",
        title="Quality",
        user=user,
        data=data,
        window_days=window_days,
        model_version=model_version or "",
        plots=_quality_plots(data, ctx.settings.critical_findings),
        export_api=auth.QUALITY_PAIRS_API,
    )


def _quality_plots(data: dict[str, Any], critical: list[str]) -> dict[str, Any]:
    """The page's charts from :func:`node.services.quality.summary`'s ``series``."""
    agreement: dict[str, dict[datetime, float | None]] = {}
    per_obs: dict[str, dict[datetime, float | None]] = {}
    volume: dict[datetime, float] = {}
    turnaround: dict[str, dict[datetime, float | None]] = {}
    for row in data["series"]:
        at = datetime.fromisoformat(row["window_start"])
        version = row["model_version"]
        obs = row["observations"]
        mean = [v["agreement"] for v in obs.values() if v["agreement"] is not None]
        agreement.setdefault(version, {})[at] = sum(mean) / len(mean) if mean else None
        volume[at] = volume.get(at, 0.0) + row["pairs"]
        hours = row["turnaround_median_s"]
        turnaround.setdefault(version, {})[at] = hours / 3600 if hours is not None else None
        for name in critical:
            label = f"{name.replace('_', ' ')} ({version})" if version else name
            per_obs.setdefault(label, {})[at] = obs[name]["agreement"]
    top = max((v for s in turnaround.values() for v in s.values() if v is not None), default=1)
    return {
        "agreement": charts.line_chart("Agreement over time, per model version", agreement),
        "critical": charts.line_chart("Agreement on critical findings", per_obs),
        "volume": charts.bar_chart("Pairs per window", volume),
        "turnaround": charts.line_chart(
            "Median turnaround draft to final (hours)", turnaround, y_max=top or 1, fmt=".1f"
        ),
    }


@router.get("/try", name="web_try", response_class=HTMLResponse)
def try_page(request: Request, user: frame.PageUser) -> Response:
    """VQA on a stored study and report -> CXR, through the API's model routes."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    studies = job_service.recent_studies(ctx)
    return frame.render(
        request,
        "try.html",
        page="try",
        title="Try the model",
        user=user,
        studies=studies,
        can_operate=user.has("operator"),
        api={"vqa": auth.VQA_API, "generate_image": auth.GENERATE_IMAGE_API},
    )


# --- small JSON routes the pages need ---------------------------------------------------------


@router.get("/ui/summary", name="web_summary")
def summary(
    request: Request, user: Annotated[auth.Principal, Depends(auth.require_viewer)]
) -> JSONResponse:
    """Counts of jobs by state and the model's status, for the queue page's refresh."""
    ctx = frame.page_context(request)
    counts = job_service.counts(ctx).jobs
    return JSONResponse(
        {"counts": counts, "model": frame.model_status(ctx).to_dict()},
        headers={"Cache-Control": "no-store"},
    )
