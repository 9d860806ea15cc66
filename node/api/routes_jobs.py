"""Job routes: list and filter, detail, retry, cancel, re-prioritise, re-send, withdraw."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from node.api import services
from node.api.auth import Principal, require_role
from node.api.context import ApiContext, api_context
from node.api.schemas import (
    AuditOut,
    CancelIn,
    DeliveryOut,
    DraftOut,
    ErrorOut,
    JobDetailOut,
    JobOut,
    JobPage,
    PriorityIn,
    SrVersionOut,
    StageOut,
    WithdrawIn,
)
from node.db import jobs as jobs_db
from node.db import views as views_db
from node.db.models import JobState

__all__ = ["router"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no or invalid token"},
    403: {"model": ErrorOut, "description": "role too weak, or CSRF check failed"},
    429: {"model": ErrorOut, "description": "too many failed authentications (Retry-After)"},
}
_JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    404: {"model": ErrorOut, "description": "no such job"},
    409: {"model": ErrorOut, "description": "the job's state does not allow this"},
}
router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=_ERRORS)
Viewer = Annotated[Principal, Depends(require_role("viewer"))]
Operator = Annotated[Principal, Depends(require_role("operator"))]
Ctx = Annotated[ApiContext, Depends(api_context)]
JobId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Job id.")]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def job_out(row: views_db.JobRow) -> JobOut:
    """API form of a job row."""
    return JobOut(**asdict(row))


@router.get("", response_model=JobPage, summary="List and filter jobs, newest first")
def list_jobs(
    ctx: Ctx,
    _p: Viewer,
    state: Annotated[list[JobState] | None, Query(description="Any of these states.")] = None,
    since: Annotated[datetime | None, Query(description="Created at or after (UTC).")] = None,
    until: Annotated[datetime | None, Query(description="Created before (UTC).")] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    destination: Annotated[
        str | None, Query(max_length=512, description="Has a delivery to this destination.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> JobPage:
    """Jobs matching every given filter (states are OR-ed)."""
    flt = views_db.JobFilter(
        states=tuple(state or ()),
        since=_utc(since),
        until=_utc(until),
        study_uid=study_uid,
        destination=destination,
        limit=limit,
        offset=offset,
    )
    with ctx.read_sessions() as session:
        rows, total = views_db.filter_jobs(session, flt)
    return JobPage(total=total, limit=limit, offset=offset, items=[job_out(r) for r in rows])


def _stages(d: views_db.JobDetail) -> list[StageOut]:
    j = d.job
    points = [
        ("received", j.created_at),
        ("queued", j.queued_at),
        ("started", j.started_at),
        ("finished", j.finished_at),
    ]
    out = []
    for k, (name, at) in enumerate(points):
        nxt = next((p for _, p in points[k + 1 :] if p is not None), None)
        seconds = (nxt - at).total_seconds() if at is not None and nxt is not None else None
        out.append(StageOut(name=name, at=at, seconds=seconds))
    for dl in d.deliveries:
        if dl.sent_at is not None:
            out.append(StageOut(name=f"delivered:{dl.destination}", at=dl.sent_at, seconds=None))
    return out


@router.get(
    "/{job_id}",
    response_model=JobDetailOut,
    responses=_JOB_ERRORS,
    summary="One job: stages, timings, draft, SR UID and the study's SR chain, deliveries, audit",
)
def get_job(job_id: JobId, ctx: Ctx, _p: Viewer) -> JobDetailOut:
    """Everything the node knows about a job (the draft text is AI generated, unverified)."""
    with ctx.read_sessions() as session:
        d = views_db.job_detail(session, job_id)
    drafts = [DraftOut(**asdict(x)) for x in d.drafts]
    return JobDetailOut(
        job=job_out(d.job),
        selected_sop_instance_uid=d.selected_sop_instance_uid,
        lease_expires_at=d.lease_expires_at,
        stages=_stages(d),
        timings=drafts[0].timings if drafts else None,
        draft=drafts[0] if drafts else None,
        drafts=drafts,
        deliveries=[DeliveryOut(**asdict(x)) for x in d.deliveries],
        audit=[AuditOut(**asdict(a)) for a in d.audit],
        sr_chain=[SrVersionOut(**asdict(v)) for v in d.sr_chain],
    )


def _reload(ctx: ApiContext, job_id: int) -> JobOut:
    with ctx.read_sessions() as session:
        return job_out(views_db.job_detail(session, job_id).job)


@router.post(
    "/{job_id}/retry",
    response_model=JobOut,
    responses=_JOB_ERRORS,
    summary="Queue a failed or cancelled job again (operator)",
)
def retry_job(job_id: JobId, ctx: Ctx, p: Operator) -> JobOut:
    """Requeue with fresh attempts; 409 unless the job is failed or cancelled. Audited."""
    with ctx.write_sessions() as session:
        jobs_db.requeue_job(session, job_id, actor=p.actor)
    return _reload(ctx, job_id)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses=_JOB_ERRORS,
    summary="Cancel a job (operator)",
)
def cancel_job(job_id: JobId, ctx: Ctx, p: Operator, body: CancelIn | None = None) -> JobOut:
    """Cancel a received, queued or running job; 409 when it is finished. Audited."""
    reason = body.reason if body is not None else None
    with ctx.write_sessions() as session:
        jobs_db.cancel_job(session, job_id, actor=p.actor, reason=reason)
    return _reload(ctx, job_id)


@router.post(
    "/{job_id}/priority",
    response_model=JobOut,
    responses=_JOB_ERRORS,
    summary="Re-prioritise a job (operator)",
)
def prioritise_job(job_id: JobId, body: PriorityIn, ctx: Ctx, p: Operator) -> JobOut:
    """Set the priority (higher first among queued jobs). Audited."""
    with ctx.write_sessions() as session:
        return job_out(views_db.set_priority(session, job_id, body.priority, actor=p.actor))


@router.post(
    "/{job_id}/resend",
    responses=_JOB_ERRORS,
    summary="Send the job's objects again to their destinations (operator)",
)
def resend_job(job_id: JobId, ctx: Ctx, p: Operator) -> dict[str, Any]:
    """Re-send the job's objects (same SOP Instance UIDs and message IDs: a PACS replaces or
    keeps, never duplicates; of a withdrawn job only the withdrawals). Audited.

    ``requeued_deliveries`` lists the delivery ids queued again (empty when the job never
    had anything to deliver)."""
    result = services.resend(ctx, job_id, principal=p)
    return {"job_id": job_id, "requeued_deliveries": _plain(result)}


@router.post(
    "/{job_id}/withdraw",
    responses=_JOB_ERRORS,
    summary="Withdraw the job's sent draft from every destination (operator)",
)
def withdraw_job(job_id: JobId, body: WithdrawIn, ctx: Ctx, p: Operator) -> dict[str, Any]:
    """Withdraw the draft: objects not yet sent are cancelled; each destination that may
    hold it gets a withdrawal (DICOM: IHE IOCM Key Object Selection rejection note; HL7:
    ORU with OBR-25 ``C``; FHIR: the DiagnosticReport ``entered-in-error``). 409 when the job
    has no draft or was withdrawn already. Audited ``job.withdraw``."""
    return services.withdraw(ctx, job_id, principal=p, reason=body.reason).to_dict()


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
