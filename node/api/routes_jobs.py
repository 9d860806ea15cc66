"""Job routes: list and filter, detail, retry, cancel, re-prioritise, re-send, withdraw."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse, Response

from node.api.deps import AUTH_ERRORS, Ctx, Limit, Offset, Operator, Reviewer, Viewer, utc
from node.api.schemas import (
    BulkIn,
    BulkItemOut,
    BulkOut,
    CancelIn,
    ErrorOut,
    JobDetailOut,
    JobPage,
    ObjectOut,
    PriorityIn,
    ReviewIn,
    StageOut,
    WithdrawIn,
)
from node.db import views as views_db
from node.db.models import ID_MAX, JobState
from node.db.views import JobRow
from node.services import jobs as job_service
from node.services import objects, quality, review

__all__ = ["router"]

_JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    404: {"model": ErrorOut, "description": "no such job"},
    409: {"model": ErrorOut, "description": "the job's state does not allow this"},
}
router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=AUTH_ERRORS)
JobId = Annotated[int, Path(ge=1, le=ID_MAX, description="Job id.")]


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
    q: Annotated[
        str | None,
        Query(
            max_length=128,
            description="Words each found in the patient's name or ID, the accession number, "
            "the study description or the Study Instance UID (case-insensitive, in part).",
        ),
    ] = None,
    patient: Annotated[
        str | None, Query(max_length=128, description="Patient's name or ID, in part.")
    ] = None,
    accession: Annotated[str | None, Query(max_length=16, description="In part.")] = None,
    modality: Annotated[str | None, Query(max_length=16, pattern=r"^[A-Za-z0-9]*$")] = None,
    calling_ae: Annotated[str | None, Query(max_length=16, description="In part.")] = None,
    study_date_from: Annotated[
        str | None, Query(pattern=r"^[0-9]{8}$", description="Study Date >= (YYYYMMDD).")
    ] = None,
    study_date_to: Annotated[
        str | None, Query(pattern=r"^[0-9]{8}$", description="Study Date <= (YYYYMMDD).")
    ] = None,
    delivery: Annotated[
        Literal["none", "pending", "sent", "failed"] | None,
        Query(description="The job's delivery state."),
    ] = None,
    sort: Annotated[
        Literal[
            "id",
            "created",
            "updated",
            "priority",
            "state",
            "study_date",
            "patient_name",
            "accession",
        ],
        Query(),
    ] = "id",
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    limit: Limit = 100,
    offset: Offset = 0,
) -> JobPage:
    """Jobs matching every given filter (states are OR-ed), sorted, one page of them."""
    flt = views_db.JobFilter(
        states=tuple(state or ()),
        since=utc(since),
        until=utc(until),
        study_uid=study_uid,
        destination=destination,
        text=q or None,
        patient=patient or None,
        accession=accession or None,
        modality=modality or None,
        calling_ae=calling_ae or None,
        study_date_from=study_date_from,
        study_date_to=study_date_to,
        delivery=delivery,
        sort=sort,
        descending=order == "desc",
        limit=limit,
        offset=offset,
    )
    rows, total = job_service.list_jobs(ctx, flt)
    return JobPage(total=total, limit=limit, offset=offset, items=rows)


def _stages(d: views_db.JobDetail) -> list[StageOut]:
    out = [StageOut(name=n, at=at, seconds=s) for n, at, s in job_service.lifecycle(d.job)]
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
    d = job_service.detail(ctx, job_id)
    drafts = d.drafts
    return JobDetailOut(
        job=d.job,
        selected_sop_instance_uid=d.selected_sop_instance_uid,
        lease_expires_at=d.lease_expires_at,
        stages=_stages(d),
        timings=drafts[0].timings if drafts else None,
        draft=drafts[0] if drafts else None,
        drafts=drafts,
        deliveries=d.deliveries,
        audit=d.audit,
        sr_chain=d.sr_chain,
        finals=quality.job_finals(ctx, job_id),
        events=d.events,
        objects=[
            ObjectOut(key=o.key, object=o.object, uid=o.uid, present=o.present, size=o.size)
            for o in objects.job_objects(ctx, job_id)
        ],
        viewer_url=job_service.viewer_link(ctx, d.job),
    )


ObjectKey = Annotated[
    str, Path(pattern=r"^(sr|[0-9]{1,10})$", description="``sr`` or a delivery id.")
]
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@router.get(
    "/{job_id}/objects/{key}",
    responses=_JOB_ERRORS,
    response_class=FileResponse,
    summary="Download one of the job's DICOM objects (viewer)",
)
def download_object(job_id: JobId, key: ObjectKey, ctx: Ctx, _p: Viewer) -> FileResponse:
    """The DICOM Part 10 file (``application/dicom``, PS3.18 §8.7.3.5.2) of the draft SR
    (``sr``) or of a delivery (its id); 410 when retention removed it."""
    obj = objects.object_file(ctx, job_id, key)
    return FileResponse(
        obj.path,
        media_type="application/dicom",
        filename=f"{obj.object}-{obj.uid or key}.dcm",
        headers=_NO_STORE,
    )


@router.get(
    "/{job_id}/objects/{key}/pdf",
    responses=_JOB_ERRORS,
    response_class=Response,
    summary="The PDF inside one of the job's Encapsulated PDF objects (viewer)",
)
def object_pdf(job_id: JobId, key: ObjectKey, ctx: Ctx, _p: Viewer) -> Response:
    """``application/pdf``, shown inline; 422 when the object is not an Encapsulated PDF."""
    return Response(
        objects.pdf_bytes(ctx, job_id, key),
        media_type="application/pdf",
        headers={**_NO_STORE, "Content-Disposition": f'inline; filename="job-{job_id}.pdf"'},
    )


@router.post(
    "/{job_id}/retry",
    response_model=JobRow,
    responses=_JOB_ERRORS,
    summary="Queue a failed or cancelled job again (operator)",
)
def retry_job(job_id: JobId, ctx: Ctx, p: Operator) -> JobRow:
    """Requeue with fresh attempts; 409 unless the job is failed or cancelled. Audited."""
    return job_service.requeue(ctx, job_id, actor=p.actor)


@router.post(
    "/bulk", response_model=BulkOut, summary="Retry, cancel or re-send many jobs (operator)"
)
def bulk_jobs(body: BulkIn, ctx: Ctx, p: Operator) -> BulkOut:
    """Apply one action to each job; a job whose state refuses it is reported, the others
    go on. Each job's action is audited as if done alone."""
    results = job_service.bulk(ctx, body.action, body.ids, actor=p.actor)
    return BulkOut(results=[BulkItemOut(job_id=r.job_id, ok=r.ok, error=r.error) for r in results])


@router.post(
    "/{job_id}/cancel",
    response_model=JobRow,
    responses=_JOB_ERRORS,
    summary="Cancel a job (operator)",
)
def cancel_job(job_id: JobId, ctx: Ctx, p: Operator, body: CancelIn | None = None) -> JobRow:
    """Cancel a received, queued or running job, and its objects not yet sent; 409 when it
    is finished. Audited."""
    reason = body.reason if body is not None else None
    return job_service.cancel(ctx, job_id, actor=p.actor, reason=reason)


@router.post(
    "/{job_id}/priority",
    response_model=JobRow,
    responses=_JOB_ERRORS,
    summary="Re-prioritise a job (operator)",
)
def prioritise_job(job_id: JobId, body: PriorityIn, ctx: Ctx, p: Operator) -> JobRow:
    """Set the priority (higher first among queued jobs). Audited."""
    return job_service.set_priority(ctx, job_id, body.priority, actor=p.actor)


@router.post(
    "/{job_id}/resend",
    responses=_JOB_ERRORS,
    summary="Send the job's objects again to their destinations (operator)",
)
def resend_job(job_id: JobId, ctx: Ctx, p: Operator) -> dict[str, Any]:
    """Re-send the job's objects (same SOP Instance UIDs and message IDs: a PACS replaces or
    keeps, never duplicates; of a withdrawn job only the withdrawals). Audited.

    ``requeued_deliveries`` lists the delivery ids queued again (empty when the job never
    had anything to deliver, or each of its rows is being sent or waits for a retry: it is
    left to that send)."""
    result = job_service.resend(ctx, job_id, actor=p.actor)
    return {"job_id": job_id, "requeued_deliveries": result}


@router.post(
    "/{job_id}/withdraw",
    responses=_JOB_ERRORS,
    summary="Withdraw the job's sent draft from every destination (operator)",
)
def withdraw_job(job_id: JobId, body: WithdrawIn, ctx: Ctx, p: Operator) -> dict[str, Any]:
    """Withdraw the draft: objects not yet sent are cancelled; each destination that may
    hold it gets a withdrawal (DICOM: IHE IOCM Key Object Selection rejection note; HL7:
    ORU with OBR-25 ``C``, held back while a later draft's result for the order is still to
    be sent there, ``held``; FHIR: the DiagnosticReport ``entered-in-error``). The study's
    other jobs whose draft is the same SR are withdrawn with it (``same_draft``), and, when
    it is the study's current draft, the earlier drafts it superseded (``superseded``: one
    such answer each). 409 when the job has no draft or was withdrawn already. Audited
    ``job.withdraw``."""
    return job_service.withdraw(ctx, job_id, actor=p.actor, reason=body.reason).to_dict()


@router.post(
    "/{job_id}/review",
    responses=_JOB_ERRORS,
    summary="Accept, edit or reject the job's draft (reviewer)",
)
def review_job(job_id: JobId, body: ReviewIn, ctx: Ctx, p: Reviewer) -> dict[str, Any]:
    """A radiologist's review at the node (role ``reviewer`` only). Accept or edit: the
    reviewed text becomes the job's final report and the draft is scored against it; reject
    needs a ``reason`` and is not scored. Audited ``draft.review``; nothing is sent."""
    result = review.review(
        ctx,
        job_id,
        review.Decision(body.decision),
        actor=p.actor,
        text=body.text,
        reason=body.reason,
    )
    return {
        "job_id": job_id,
        "final_id": result.final_id,
        "decision": result.decision.value,
        "agreement": result.agreement,
        "significant_discrepancy": result.significant,
    }
