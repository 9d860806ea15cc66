"""The console's queue and job pages: the queue (the study's identity, search, sorting and
paging, bulk actions), one job (draft, final report, history, objects, deliveries, actions)
and an SR of the job rendered as a document.

The queue is searched, sorted and paged on the server (:class:`node.db.views.JobFilter`);
``static/console.js`` refreshes the current page every 2 s from ``GET /api/jobs`` with the
same query, and posts the operator actions to the API (which enforces the roles).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response

from models.labeler import OBSERVATIONS
from node.db import views as views_db
from node.db.jobs import JobNotFound
from node.db.models import ID_MAX, JobState
from node.services import jobs as job_service
from node.services import objects as job_objects
from node.services import quality, review
from node.services.errors import Gone, InvalidInput, NotFound
from node.web import auth, frame

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

QUEUE_SORTS = tuple(views_db.SORT_COLUMNS)
#: a job id as the API's paths take it (1..ID_MAX): another is bad input (422), never a
#: value the database cannot bind
JobId = Annotated[int, PathParam(ge=1, le=ID_MAX)]


def _study_date(value: str | None) -> str | None:
    """``YYYY-MM-DD`` (an ``<input type=date>`` value) as a DICOM DA ``YYYYMMDD``."""
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").strftime("%Y%m%d")
    except ValueError:
        return None


def _api_query(flt: views_db.JobFilter, order: str) -> dict[str, str | int]:
    """The jobs API's query for the page's search (the page's script refreshes from it)."""
    values: dict[str, str | int | None] = {
        "q": flt.text,
        "delivery": flt.delivery,
        "modality": flt.modality,
        "calling_ae": flt.calling_ae,
        "study_date_from": flt.study_date_from,
        "study_date_to": flt.study_date_to,
        "sort": flt.sort,
        "order": order,
        "limit": flt.limit,
        "offset": flt.offset,
    }
    return {k: v for k, v in values.items() if v not in ("", None)}


@router.get("/", name="web_queue", response_class=HTMLResponse)
def queue_page(
    request: Request,
    user: frame.PageUser,
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
    page: frame.PageNo = 1,
    per: frame.PerPage = 50,
) -> Response:
    """The queue: jobs with their study's identity, searched, sorted and paged on the
    server (the script refreshes the current page every 2 s), counts by state."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
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

    return frame.render(
        request,
        "queue.html",
        page="queue",
        title="Queue",
        user=user,
        jobs=jobs,
        counts=counts,
        states=[s.value for s in JobState],
        delivery_states=list(views_db.DELIVERY_STATES),
        **frame.paging(request, "web_queue", params, page=page, per=per, total=total),
        state=params["state"],
        jobs_api=f"{auth.JOBS_API}?{urlencode(_api_query(flt, order))}",
        bulk_api=f"{auth.JOBS_API}/bulk",
        can_operate=user.has("operator"),
    )


@router.get("/jobs/{job_id}", name="web_job", response_class=HTMLResponse)
def job_page(request: Request, user: frame.PageUser, job_id: JobId) -> Response:
    """One job: stages and timings, the AI draft (labelled), SR UID, deliveries, actions."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    try:
        detail = job_service.detail(ctx, job_id)
    except JobNotFound:
        return frame.render(
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
    return frame.render(
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
        can_review=user.has("reviewer") and review.reviewable(ctx, job.id),
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
    user: frame.PageUser,
    job_id: JobId,
    key: Annotated[str, PathParam(pattern=r"^(sr|[0-9]{1,10})$")],
) -> Response:
    """An SR object of the job as a document: its flags and its content tree (TID 2000)."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    try:
        doc = job_objects.sr_document(ctx, job_id, key)
    except (NotFound, Gone, InvalidInput) as exc:
        status = 404 if isinstance(exc, NotFound) else 410 if isinstance(exc, Gone) else 422
        return frame.render(
            request,
            "error.html",
            page="error",
            title="Not available",
            user=user,
            status_code=status,
            detail=str(exc),
        )
    return frame.render(
        request,
        "sr.html",
        page="job",
        title=f"Job {job_id}: {doc.title}",
        user=user,
        job_id=job_id,
        key=key,
        doc=doc,
    )
