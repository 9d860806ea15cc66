"""The web console's pages: queue, job detail, destinations, try-the-model, login.

Plain server-rendered HTML (Jinja2, autoescaped) with one small script (``static/console.js``)
that refreshes the queue from the JSON API every 2 s and posts the operator actions with the
CSRF header (double-submit cookie). Authentication is the API's (``node.api.auth``): a page
request without a valid session is redirected to ``/login``; actions are enforced by the
API's role checks whatever the page shows. Every page carries a Content-Security-Policy that
allows only the node itself, and the pages never log report text or patient data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from models.labeler import OBSERVATIONS
from node.db import views as views_db
from node.db.jobs import JobNotFound
from node.db.models import JobState
from node.services import jobs as job_service
from node.services import objects as job_objects
from node.services import quality
from node.services import system as system_service
from node.services.context import ServiceContext
from node.services.errors import Gone, InvalidInput, NotFound
from node.settings import DicomDestination, FhirDestination, Hl7Destination, StowDestination
from node.web import auth, charts

__all__ = [
    "CSP",
    "PAGE_SIZES",
    "ModelStatus",
    "PageUser",
    "login_redirect",
    "model_status",
    "page_context",
    "page_count",
    "page_url",
    "render",
    "router",
]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
# self only; blob: for the generated PNG shown by the Try page (an object URL of a fetch)
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # pages hold draft report text: keep them out of shared caches and the back/forward cache
    "Cache-Control": "no-store",
}


router = APIRouter(include_in_schema=False)

_env = Environment(
    loader=FileSystemLoader(str(HERE / "templates")),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _fmt_num(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else f"{value:.3f}"
    return str(value)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 120:
        return f"{sign}{s:.0f} s"
    if s < 7200:
        return f"{sign}{s / 60:.0f} min"
    return f"{sign}{s / 3600:.1f} h"


def _fmt_pn(value: str | None) -> str:
    """A Person Name (PS3.5 6.2, ``Family^Given^Middle^Prefix^Suffix``, alphabetic group)
    as ``FAMILY, Given Middle``."""
    if not value:
        return ""
    parts = [p.strip() for p in value.split("=")[0].split("^")]
    family, rest = parts[0], " ".join(p for p in parts[1:4] if p)
    return f"{family}, {rest}" if family and rest else family or rest


def _fmt_da(value: str | None) -> str:
    """A DICOM date (DA, ``YYYYMMDD``) as ``YYYY-MM-DD``."""
    if not value or len(value) != 8:
        return value or ""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def _span(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


_env.globals.update(
    fmt_time=_fmt_time,
    fmt_num=_fmt_num,
    fmt_duration=_fmt_duration,
    fmt_pn=_fmt_pn,
    fmt_da=_fmt_da,
    span=_span,
)


@dataclass(frozen=True)
class ModelStatus:
    """What the console shows about the model: ``state`` is ready, loading, error or none."""

    state: str
    demo: bool = False
    name: str | None = None
    version: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "state": self.state,
            "demo": self.demo,
            "name": self.name,
            "version": self.version,
            "error": self.error,
        }


def model_status(ctx: ServiceContext) -> ModelStatus:
    """What the page frame shows of this process's model
    (:func:`node.services.system.model_state`): ``none`` without a model, ``error`` when
    loading failed, ``ready`` once warmed up, ``loading`` otherwise."""
    m = system_service.model_state(ctx)
    return ModelStatus(state=m.state, demo=m.demo, name=m.name, version=m.version, error=m.error)


def render(
    request: Request,
    template: str,
    *,
    page: str,
    title: str,
    user: auth.Principal | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """Render a console page: ``template`` with the page frame's context (user, model state,
    quality alert, CSRF token, ``url``/``static_url``) and ``context``; security headers
    (CSP, no-store) on the response."""
    ctx = page_context(request)
    settings = ctx.settings

    def url(route: str, /, **params: Any) -> str:
        return str(request.app.url_path_for(route, **{k: str(v) for k, v in params.items()}))

    def static_url(filename: str) -> str:
        return url("web_static", name=filename)

    html = _env.get_template(template).render(
        page=page,
        page_title=title,
        user=user,
        ae_title=settings.ae_title,
        model=model_status(ctx),
        quality_alert=quality.alert_state(ctx) if user is not None else None,
        csrf_token=auth.csrf_token(request),
        csrf_header=auth.CSRF_HEADER,
        csrf_cookie=auth.CSRF_COOKIE,
        url=url,
        static_url=static_url,
        status_code=status_code,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def login_redirect(request: Request) -> RedirectResponse:
    """303 to the login page, which comes back to this page (path and query) after it."""
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    resp = RedirectResponse(
        str(request.app.url_path_for("web_login")) + "?next=" + _quote(target), status_code=303
    )
    for k, v in SECURITY_HEADERS.items():
        resp.headers[k] = v
    return resp


def _quote(text: str) -> str:
    return quote(text, safe="/")


PageUser = Annotated[auth.Principal | None, Depends(auth.optional_principal)]


def page_context(request: Request) -> ServiceContext:
    """The services' context of the application serving ``request``."""
    return auth.api_context(request)


PAGE_SIZES = (25, 50, 100, 200)
"""The page sizes a paged console list offers."""


def page_url(request: Request, route: str, params: dict[str, Any]) -> Callable[..., str]:
    """A function giving the URL of page ``route`` with the query ``params`` updated by its
    keyword arguments (empty values left out): the links of a paged, filtered list."""
    base = str(request.app.url_path_for(route))

    def url(**changes: Any) -> str:
        kept = {k: v for k, v in {**params, **changes}.items() if v not in ("", None)}
        return base + ("?" + urlencode(kept) if kept else "")

    return url


def page_count(total: int, per: int) -> int:
    """How many pages of ``per`` rows ``total`` rows fill (at least one)."""
    return max(1, math.ceil(total / per))


# --- static files ---------------------------------------------------------------------------


@router.get("/static/{name}", name="web_static")
def static(name: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]+$")]) -> Response:
    """Serve the console's CSS and JavaScript (only files lying in ``static/``)."""
    path = STATIC_DIR / name
    media = STATIC_TYPES.get(path.suffix)
    if media is None or not path.is_file() or path.parent != STATIC_DIR:
        raise HTTPException(status_code=404, detail="no such static file")
    return FileResponse(
        path,
        media_type=media,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


# --- login ------------------------------------------------------------------------------------


@router.get("/login", name="web_login", response_class=HTMLResponse)
def login_page(request: Request, user: PageUser) -> Response:
    """The login page: paste a token; ``console.js`` posts it to ``POST /api/session``."""
    if user is not None:
        return RedirectResponse(str(request.app.url_path_for("web_queue")), status_code=303)
    return render(request, "login.html", page="login", title="Log in", user=None)


# --- pages ------------------------------------------------------------------------------------


QUEUE_SORTS = tuple(views_db.SORT_COLUMNS)


def _study_date(value: str | None) -> str | None:
    """``YYYY-MM-DD`` (an ``<input type=date>`` value) as a DICOM DA ``YYYYMMDD``."""
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").strftime("%Y%m%d")
    except ValueError:
        return None


@router.get("/", name="web_queue", response_class=HTMLResponse)
def queue_page(
    request: Request,
    user: PageUser,
    state_name: Annotated[
        str, Query(alias="state", pattern="^(|" + "|".join(s.value for s in JobState) + ")$")
    ] = "",
    q: Annotated[str, Query(max_length=128)] = "",
    delivery: Annotated[str, Query(pattern=r"^(|none|pending|sent|failed)$")] = "",
    modality: Annotated[str, Query(max_length=16, pattern=r"^[A-Za-z0-9]*$")] = "",
    calling_ae: Annotated[str, Query(max_length=16)] = "",
    date_from: Annotated[str, Query(max_length=10)] = "",
    date_to: Annotated[str, Query(max_length=10)] = "",
    sort: Annotated[str, Query(pattern="^(" + "|".join(QUEUE_SORTS) + ")$")] = "id",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    page: Annotated[int, Query(ge=1, le=10**6)] = 1,
    per: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Response:
    """The queue: jobs with their study's identity, searched, sorted and paged on the
    server (the script refreshes the current page every 2 s), counts by state."""
    if user is None:
        return login_redirect(request)
    ctx = page_context(request)
    state = JobState(state_name) if state_name else None
    text, ae, mod = q.strip(), calling_ae.strip(), modality.upper()
    date_lo, date_hi = _study_date(date_from), _study_date(date_to)
    flt = views_db.JobFilter(
        states=(state,) if state else (),
        text=text or None,
        delivery=delivery or None,
        modality=mod or None,
        calling_ae=ae or None,
        study_date_from=date_lo,
        study_date_to=date_hi,
        sort=sort,
        descending=order == "desc",
        limit=per,
        offset=(page - 1) * per,
    )
    search: dict[str, str | int | None] = {
        "q": text,
        "delivery": delivery,
        "modality": mod,
        "calling_ae": ae,
        "study_date_from": date_lo,
        "study_date_to": date_hi,
        "sort": sort,
        "order": order,
        "limit": per,
        "offset": (page - 1) * per,
    }
    jobs, total = job_service.list_jobs(ctx, flt)
    counts = job_service.counts(ctx).jobs
    params = {
        "q": text,
        "state": state.value if state else "",
        "delivery": delivery,
        "modality": mod,
        "calling_ae": ae,
        "date_from": date_from if date_lo else "",
        "date_to": date_to if date_hi else "",
        "sort": sort,
        "order": order,
        "per": per,
    }

    queue_url = page_url(request, "web_queue", {**params, "page": page})

    api_query = {k: v for k, v in search.items() if v not in ("", None)}
    return render(
        request,
        "queue.html",
        page="queue",
        title="Queue",
        user=user,
        jobs=jobs,
        total=total,
        counts=counts,
        states=[s.value for s in JobState],
        delivery_states=list(views_db.DELIVERY_STATES),
        params=params,
        page_no=page,
        per=per,
        page_sizes=PAGE_SIZES,
        pages=page_count(total, per),
        queue_url=queue_url,
        state=params["state"],
        jobs_api=f"{auth.JOBS_API}?{urlencode(api_query)}",
        bulk_api=f"{auth.JOBS_API}/bulk",
        can_operate=user.has("operator"),
    )


@router.get("/jobs/{job_id}", name="web_job", response_class=HTMLResponse)
def job_page(request: Request, user: PageUser, job_id: Annotated[int, PathParam(ge=1)]) -> Response:
    """One job: stages and timings, the AI draft (labelled), SR UID, deliveries, actions."""
    if user is None:
        return login_redirect(request)
    ctx = page_context(request)
    try:
        detail = job_service.detail(ctx, job_id)
    except JobNotFound:
        return render(
            request,
            "error.html",
            page="error",
            title="Not found",
            user=user,
            status_code=404,
            detail=f"job {job_id} does not exist",
        )
    job = detail.job
    reports = [d for d in detail.drafts if d.task == "report"]
    return render(
        request,
        "job.html",
        page="job",
        title=f"Job {job.id}",
        user=user,
        job=job,
        detail=detail,
        draft=reports[0] if reports else None,
        stages=job_service.lifecycle(job),
        finals=quality.job_finals(ctx, job.id),
        observations=[o.value for o in OBSERVATIONS],
        can_operate=user.has("operator"),
        can_review=user.has("reviewer"),
        api=auth.job_action_urls(job.id),
        history=_history(detail),
        objects=job_objects.job_objects(ctx, job.id),
        viewer_url=job_service.viewer_link(ctx, job),
    )


def _history(detail: views_db.JobDetail) -> list[dict[str, Any]]:
    """The job's events and its audit entries (operator actions), oldest first."""
    rows: list[dict[str, Any]] = [
        {"at": e.at, "kind": e.kind, "actor": e.actor, "detail": e.detail or {}}
        for e in detail.events
    ]
    rows += [
        {"at": a.at, "kind": a.action, "actor": a.actor, "detail": a.detail or {}}
        for a in detail.audit
    ]
    return sorted(rows, key=lambda r: r["at"])


@router.get("/jobs/{job_id}/sr/{key}", name="web_sr", response_class=HTMLResponse)
def sr_page(
    request: Request,
    user: PageUser,
    job_id: Annotated[int, PathParam(ge=1)],
    key: Annotated[str, PathParam(pattern=r"^(sr|[0-9]{1,10})$")],
) -> Response:
    """An SR object of the job as a document: its flags and its content tree (TID 2000)."""
    if user is None:
        return login_redirect(request)
    ctx = page_context(request)
    try:
        doc = job_objects.sr_document(ctx, job_id, key)
    except (NotFound, Gone, InvalidInput) as exc:
        status = 404 if isinstance(exc, NotFound) else 410 if isinstance(exc, Gone) else 422
        return render(
            request,
            "error.html",
            page="error",
            title="Not available",
            user=user,
            status_code=status,
            detail=str(exc),
        )
    return render(
        request,
        "sr.html",
        page="job",
        title=f"Job {job_id}: {doc.title}",
        user=user,
        job_id=job_id,
        key=key,
        doc=doc,
    )


def _destination_label(
    d: DicomDestination | StowDestination | Hl7Destination | FhirDestination,
) -> str:
    """How a destination is shown: ``AET@host:port``, ``mllp://host:port``, or the STOW-RS /
    FHIR URL without its query."""
    if isinstance(d, StowDestination | FhirDestination):
        return urlsplit(str(d))._replace(query="", fragment="").geturl()
    return str(d)


@router.get("/destinations", name="web_destinations", response_class=HTMLResponse)
def destinations_page(request: Request, user: PageUser) -> Response:
    """Configured destinations with their delivery history (last success / failure)."""
    if user is None:
        return login_redirect(request)
    ctx = page_context(request)
    settings = ctx.settings
    # delivery rows name a destination by str(d) (node.db.deliveries)
    keys = [str(d) for d in settings.destinations]
    health = job_service.destination_health(ctx, keys)
    rows = [
        {"text": _destination_label(d), "kind": d.kind, "health": health[k]}
        for k, d in zip(keys, settings.destinations, strict=True)
    ]
    return render(
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
    user: PageUser,
    model_version: Annotated[str | None, Query(max_length=64)] = None,
    window_days: Annotated[int, Query(ge=1, le=366)] = 7,
) -> Response:
    """Draft/final concordance: agreement over time per model version and per critical
    observation, volume, turnaround, the discrepancy list, the export links."""
    if user is None:
        return login_redirect(request)
    ctx = page_context(request)
    data = quality.summary(
        ctx, model_version=model_version or None, window=timedelta(days=window_days)
    )
    return render(
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
def try_page(request: Request, user: PageUser) -> Response:
    """VQA on a stored study and report -> CXR, through the API's model routes."""
    if user is None:
        return login_redirect(request)
    ctx = page_context(request)
    studies = job_service.recent_studies(ctx)
    return render(
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
    ctx = page_context(request)
    counts = job_service.counts(ctx).jobs
    return JSONResponse(
        {"counts": counts, "model": model_status(ctx).to_dict()},
        headers={"Cache-Control": "no-store"},
    )
