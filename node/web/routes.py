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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from node.api.context import ApiContext
from node.db import audit as audit_db
from node.db import views as views_db
from node.db.jobs import JobNotFound
from node.db.models import JobState
from node.db.studies import recent_studies
from node.db.views import destination_health
from node.settings import DicomDestination, FhirDestination, Hl7Destination, StowDestination
from node.web import auth

__all__ = ["CSP", "ModelStatus", "model_status", "router"]

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

QUEUE_LIMIT = 100  # rows on the queue page

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


_env.globals.update(fmt_time=_fmt_time, fmt_num=_fmt_num)


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


def model_status(host: Any) -> ModelStatus:
    """The model host's state (:class:`node.runtime.modelhost.ModelHost` or ``None``).

    ``none`` when the node runs without a model; ``error`` when loading failed; ``ready``
    once warmed up; ``loading`` otherwise.
    """
    if host is None:
        return ModelStatus(state="none")
    try:
        info = dict(host.info() or {})
    except Exception as exc:  # a broken host must not take the console down
        return ModelStatus(state="error", error=type(exc).__name__)
    demo = bool(info.get("demo"))
    name = info.get("model_name")
    version = info.get("model_version")
    error = info.get("error")
    state = str(info.get("state") or "")
    if bool(getattr(host, "ready", False)):
        state = "ready"
    elif error:
        state = "error"
    elif state not in ("loading", "error", "ready"):
        state = "loading"
    return ModelStatus(
        state=state,
        demo=demo,
        name=None if name is None else str(name),
        version=None if version is None else str(version),
        error=None if error is None else str(error),
    )


def _render(
    request: Request,
    template: str,
    *,
    page: str,
    title: str,
    user: auth.Principal | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    ctx = _ctx(request)
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
        model=model_status(ctx.host()),
        csrf_token=auth.csrf_token(request),
        csrf_header=auth.CSRF_HEADER,
        csrf_cookie=auth.CSRF_COOKIE,
        url=url,
        static_url=static_url,
        status_code=status_code,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def _login_redirect(request: Request) -> RedirectResponse:
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


def _ctx(request: Request) -> ApiContext:
    return auth.api_context(request)


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
    return _render(request, "login.html", page="login", title="Log in", user=None)


# --- pages ------------------------------------------------------------------------------------


@router.get("/", name="web_queue", response_class=HTMLResponse)
def queue_page(
    request: Request,
    user: PageUser,
    state: Annotated[JobState | None, Query()] = None,
) -> Response:
    """The queue: jobs newest first (refreshed every 2 s by the script), counts by state."""
    if user is None:
        return _login_redirect(request)
    ctx = _ctx(request)
    flt = views_db.JobFilter(states=(state,) if state else (), limit=QUEUE_LIMIT)
    with auth.read_session(ctx) as session:
        jobs, _total = views_db.filter_jobs(session, flt)
        counts = views_db.counts(session).jobs
    return _render(
        request,
        "queue.html",
        page="queue",
        title="Queue",
        user=user,
        jobs=jobs,
        counts=counts,
        states=[s.value for s in JobState],
        state=state.value if state else "",
        jobs_api=f"{auth.JOBS_API}?limit={QUEUE_LIMIT}",
    )


@router.get("/jobs/{job_id}", name="web_job", response_class=HTMLResponse)
def job_page(request: Request, user: PageUser, job_id: Annotated[int, PathParam(ge=1)]) -> Response:
    """One job: stages and timings, the AI draft (labelled), SR UID, deliveries, actions."""
    if user is None:
        return _login_redirect(request)
    ctx = _ctx(request)
    try:
        with auth.read_session(ctx) as session:
            detail = views_db.job_detail(session, job_id)
    except JobNotFound:
        return _render(
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
    return _render(
        request,
        "job.html",
        page="job",
        title=f"Job {job.id}",
        user=user,
        job=job,
        detail=detail,
        draft=reports[0] if reports else None,
        stages=_stages(job),
        can_operate=user.has("operator"),
        api=auth.job_action_urls(job.id),
    )


def _stages(job: views_db.JobRow) -> list[tuple[str, datetime | None, float | None]]:
    """Life-cycle points with the seconds until the next known point."""
    points = [
        ("received", job.created_at),
        ("queued", job.queued_at),
        ("started", job.started_at),
        ("finished", job.finished_at),
    ]
    out: list[tuple[str, datetime | None, float | None]] = []
    for k, (name, at) in enumerate(points):
        nxt = next((p for _, p in points[k + 1 :] if p is not None), None)
        secs = (nxt - at).total_seconds() if at is not None and nxt is not None else None
        out.append((name, at, secs))
    return out


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
        return _login_redirect(request)
    ctx = _ctx(request)
    settings = ctx.settings
    # delivery rows name a destination by str(d) (node.db.deliveries)
    keys = [str(d) for d in settings.destinations]
    with auth.read_session(ctx) as session:
        health = destination_health(session, keys)
    rows = [
        {"text": _destination_label(d), "kind": d.kind, "health": health[k]}
        for k, d in zip(keys, settings.destinations, strict=True)
    ]
    return _render(
        request,
        "destinations.html",
        page="destinations",
        title="Destinations",
        user=user,
        destinations=rows,
        can_operate=user.has("operator"),
    )


@router.get("/try", name="web_try", response_class=HTMLResponse)
def try_page(request: Request, user: PageUser) -> Response:
    """VQA on a stored study and report -> CXR, through the API's model routes."""
    if user is None:
        return _login_redirect(request)
    ctx = _ctx(request)
    with auth.read_session(ctx) as session:
        studies = recent_studies(session)
    return _render(
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
    ctx = _ctx(request)
    with auth.read_session(ctx) as session:
        counts = views_db.counts(session).jobs
    return JSONResponse(
        {"counts": counts, "model": model_status(ctx.host()).to_dict()},
        headers={"Cache-Control": "no-store"},
    )


@router.post(
    "/api/destinations/{index}/echo",
    name="web_destination_echo",
    include_in_schema=True,
    tags=["destinations"],
    summary="C-ECHO a configured DICOM destination (operator)",
)
async def destination_echo(
    request: Request,
    index: Annotated[int, PathParam(ge=0)],
    user: Annotated[auth.Principal, Depends(auth.require_operator)],
) -> JSONResponse:
    """C-ECHO configured destination ``index`` (Verification SOP Class, PS3.4 Annex A).

    Operators only (CSRF-checked for cookie sessions). Returns ``{"ok": bool, ...}``; a
    STOW-RS destination has no C-ECHO (409). The action is written to the audit log.
    """
    from integration.scu import DicomDestination as ScuDestination
    from integration.scu import echo
    from node.tls import client_context

    ctx = _ctx(request)
    settings = ctx.settings
    if index >= len(settings.destinations):
        raise HTTPException(status_code=404, detail=f"no destination {index} is configured")
    dest = settings.destinations[index]
    if not isinstance(dest, DicomDestination):
        raise HTTPException(
            status_code=409, detail=f"destination {index} is STOW-RS: C-ECHO is DIMSE only"
        )
    target = ScuDestination(ae_title=dest.ae_title, host=dest.host, port=dest.port)
    timeout = min(settings.acse_timeout, 10.0)
    ssl_context = client_context(settings)
    ok = await anyio.to_thread.run_sync(
        lambda: echo(
            target,
            settings.ae_title,
            acse_timeout=timeout,
            dimse_timeout=timeout,
            network_timeout=timeout,
            connection_timeout=timeout,
            ssl_context=ssl_context,
        )
    )
    log.info("C-ECHO %s requested by %s: %s", target, user.actor, "success" if ok else "failed")
    with ctx.write_sessions() as session:
        audit_db.audit(
            session,
            actor=user.actor,
            action="destination.echo",
            target=f"destination:{index}",
            detail={"destination": str(target), "ok": ok},
        )
    return JSONResponse({"ok": ok, "destination": str(target), "index": index})
