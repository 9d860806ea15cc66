"""Interactive model tasks: VQA on a stored study, report on demand, report -> CXR.

``router`` holds the JSON routes; ``upload_router`` the upload (``POST /api/report``), which
:func:`node.api.app.create_app` includes with the ``api_max_upload_mb`` body limit.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Path, Query, UploadFile
from fastapi.responses import Response

from node.api.deps import AUTH_ERRORS, MODEL_ERRORS, Ctx, Operator
from node.api.schemas import UID_PATTERN, ErrorOut, GenerateImageIn, ReportOut, VqaIn, VqaOut
from node.services import tasks
from node.services.images import MIB

__all__ = ["router", "upload_router"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    413: {"model": ErrorOut, "description": "request body over the route's limit"},
    **MODEL_ERRORS,
}
router = APIRouter(prefix="/api", tags=["model"], responses=_ERRORS)
upload_router = APIRouter(prefix="/api", tags=["model"], responses=_ERRORS)
UID = Annotated[str, Path(max_length=64, pattern=UID_PATTERN)]


@router.post(
    "/studies/{study_uid}/vqa",
    response_model=VqaOut,
    responses={404: {"model": ErrorOut, "description": "no such study or instance"}},
    summary="Ask a question about a stored study's image (CXR-VQA, operator)",
)
def vqa(study_uid: UID, body: VqaIn, ctx: Ctx, p: Operator) -> VqaOut:
    """Answer about the study's frontal image (the one its job used, or chosen now), or the
    instance named by ``sop_instance_uid``. AI generated, unverified. Audited."""
    answer, img = tasks.vqa_for_study(
        ctx, study_uid, body.question, sop_instance_uid=body.sop_instance_uid, actor=p.actor
    )
    return VqaOut.model_validate(
        {
            **asdict(answer),
            "study_uid": study_uid,
            "sop_instance_uid": img.sop_instance_uid,
            "image_choice": img.how,
            "answer": answer.text,
        }
    )


@upload_router.post(
    "/report",
    response_model=ReportOut,
    responses={413: {"model": ErrorOut, "description": "upload over api_max_upload_mb"}},
    summary="Draft a report for an uploaded DICOM image (operator; nothing sent)",
    form_limits={"max_files": 1},
)
def report(file: Annotated[UploadFile, File()], ctx: Ctx, p: Operator) -> ReportOut:
    """Upload a DICOM Part 10 image (or PNG) as multipart field ``file``; get the draft
    text back. Nothing is stored, nothing goes to PACS. AI generated, unverified.

    The request body may be at most ``api_max_upload_mb`` MiB (else 413, checked before
    the body is read); the caller is authenticated before any of it is read."""
    limit = ctx.settings.api_max_upload_mb * MIB
    data = file.file.read(limit + 1)
    draft, sop = tasks.report_for_upload(ctx, data, actor=p.actor, max_bytes=limit)
    return ReportOut.model_validate({**asdict(draft), "sop_instance_uid": sop})


@router.post(
    "/generate-image",
    responses={
        200: {
            "content": {"image/png": {}, "application/dicom": {}},
            "description": "PNG (256x256 grey) or DICOM Secondary Capture (synthetic)",
        },
    },
    response_class=Response,
    summary="Generate a synthetic CXR from report text (operator)",
)
def generate_image(
    body: GenerateImageIn,
    ctx: Ctx,
    p: Operator,
    format: Annotated[Literal["png", "dicom"], Query()] = "png",
) -> Response:
    """Report -> CXR: exactly 256 VQ-GAN codes decoded to a 256x256 image. ``format=dicom``
    returns a Secondary Capture marked synthetic (Image Type DERIVED\\SECONDARY, Conversion
    Type SYN). Queued for a PACS only with ``send=true`` and a configured ``destination``
    (the delivery worker sends it, with retries). Headers: ``X-Image-Codes`` (the 256
    codes), ``X-Model-Name``, ``X-Model-Version``, ``X-Demo``, ``X-SOP-Instance-UID``
    (DICOM), ``X-Queued-To`` and ``X-Delivery-Id`` when queued. Audited."""
    res = tasks.make_image(
        ctx,
        body.report,
        actor=p.actor,
        as_dicom=format == "dicom",
        seed=body.seed,
        greedy=body.greedy,
        study_uid=body.study_uid,
        send=body.send,
        destination=body.destination,
    )
    g = res.generated
    headers = {
        "X-Image-Codes": ",".join(str(int(c)) for c in g.codes),
        "X-Model-Name": g.model_name,
        "X-Model-Version": g.model_version,
        "X-Demo": "true" if g.demo else "false",
        "Cache-Control": "no-store",
    }
    if res.queued_to:
        headers["X-Queued-To"] = res.queued_to
        headers["X-Delivery-Id"] = str(res.delivery_id)
    if format == "dicom" and res.sc is not None:
        from integration.sc import to_part10_bytes

        headers["X-SOP-Instance-UID"] = str(res.sc.SOPInstanceUID)
        return Response(to_part10_bytes(res.sc), media_type="application/dicom", headers=headers)
    return Response(res.png, media_type="image/png", headers=headers)
