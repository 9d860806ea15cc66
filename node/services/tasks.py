"""The model's tasks on demand: CXR-VQA, a report for an upload, report -> CXR.

Each is audited with UIDs only (``model.vqa``, ``model.report``, ``model.generate_image``,
``image.send``), never the question, the report text or patient data. Nothing is stored
or sent unless asked: a synthetic Secondary Capture with ``send`` becomes a delivery row
that the delivery worker sends, with its retries and TLS settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from node import metrics
from node.db import audit as audit_db
from node.db import study_views
from node.services.context import ServiceContext
from node.services.errors import Gone, InvalidInput, NotConfigured, NotFound
from node.services.images import MAX_UPLOAD_BYTES, gray8_from_bytes, gray8_from_file, png_bytes
from node.services.model_use import interactive_model
from node.settings import DicomDestination, Settings, StowDestination

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from models.results import Answer, GeneratedImage, ReportDraft
    from models.runtime import LLMCXR

__all__ = [
    "ImageResult",
    "StudyImage",
    "answer_question",
    "draft_report",
    "make_image",
    "report_for_upload",
    "study_image",
    "study_pixels",
    "vqa_for_study",
]

log = logging.getLogger(__name__)


def _observe(task: str, timings: dict[str, float]) -> None:
    metrics.observe_generation(task, timings.get("tokens", 0.0), timings.get("decode_s", 0.0))
    for key, stage in (("encode_s", "encode"), ("decode_s", "generate")):
        if timings.get(key):
            metrics.observe_stage(f"{task}_{stage}", float(timings[key]))


def answer_question(runtime: LLMCXR, gray8: npt.NDArray[np.uint8], question: str) -> Answer:
    """CXR-VQA on an 8-bit grey image (the model's own preprocessing applies)."""
    from models.preprocess import to_model_input

    answer = runtime.vqa(to_model_input(gray8), question)
    _observe("vqa", answer.timings)
    return answer


def draft_report(runtime: LLMCXR, gray8: npt.NDArray[np.uint8]) -> ReportDraft:
    """Draft a report for an 8-bit grey image."""
    from models.preprocess import to_model_input

    draft = runtime.report(to_model_input(gray8))
    _observe("report", draft.timings)
    return draft


@dataclass(frozen=True)
class StudyImage:
    """The image of a stored study that a task runs on."""

    study_uid: str
    sop_instance_uid: str
    path: Path
    how: str  # "requested", "selected by job", "selected now"


def study_image(ctx: ServiceContext, study_uid: str, sop_instance_uid: str | None) -> StudyImage:
    """Pick the image of a stored study: the one asked for, the one its job selected, or
    the frontal image chosen now (:func:`integration.selection.select_frontal`).

    Raises
    ------
    node.db.study_views.StudyNotFound
        For an unknown study (404).
    node.services.errors.NotFound
        For an instance not in the study.
    integration.errors.NoFrontalImageError
        422 when no instance is frontal.
    """
    with ctx.read_sessions() as session:
        imgs = study_views.study_instances(session, study_uid)
    paths = dict(imgs.instances)
    root = Path(ctx.settings.spool_dir)
    if sop_instance_uid is not None:
        if sop_instance_uid not in paths:
            raise NotFound(
                f"SOP Instance UID {sop_instance_uid} is not an instance of study {study_uid}"
            )
        return StudyImage(study_uid, sop_instance_uid, root / paths[sop_instance_uid], "requested")
    chosen = imgs.selected_sop_instance_uid
    if chosen in paths:
        return StudyImage(study_uid, chosen, root / paths[chosen], "selected by job")
    if not paths:
        raise InvalidInput(f"study {study_uid} has no stored instances")
    from pydicom import dcmread

    from integration.selection import select_frontal

    headers = []
    uids = []
    for uid, rel in imgs.instances:
        try:
            headers.append(dcmread(root / rel, stop_before_pixels=True))
            uids.append(uid)
        except Exception as exc:
            log.warning("study %s: instance %s unreadable: %s", study_uid, uid, type(exc).__name__)
    sel = select_frontal(headers)
    uid = uids[sel.index]
    return StudyImage(study_uid, uid, root / paths[uid], "selected now")


def study_pixels(
    ctx: ServiceContext, study_uid: str, sop_instance_uid: str | None
) -> tuple[StudyImage, npt.NDArray[np.uint8]]:
    """The image of a stored study that a task runs on (:func:`study_image`) and its
    8-bit grey pixels.

    Raises
    ------
    node.services.errors.Gone
        When the instance's file is no longer in the spool (410).
    node.db.study_views.StudyNotFound, node.services.errors.NotFound
        As for :func:`study_image`.
    """
    img = study_image(ctx, study_uid, sop_instance_uid)
    try:
        gray8, _ds = gray8_from_file(img.path)
    except FileNotFoundError:
        raise Gone(f"instance {img.sop_instance_uid} is no longer in the spool") from None
    return img, gray8


def vqa_for_study(
    ctx: ServiceContext,
    study_uid: str,
    question: str,
    *,
    sop_instance_uid: str | None,
    actor: str,
) -> tuple[Answer, StudyImage]:
    """Answer a question about a stored study's image (audited as ``model.vqa``)."""
    img, gray8 = study_pixels(ctx, study_uid, sop_instance_uid)
    with interactive_model(ctx) as runtime:
        answer = answer_question(runtime, gray8, question)
    _audit(ctx, actor, "model.vqa", f"study:{study_uid}", {"sop": img.sop_instance_uid})
    return answer, img


def report_for_upload(
    ctx: ServiceContext, data: bytes, *, actor: str, max_bytes: int = MAX_UPLOAD_BYTES
) -> tuple[ReportDraft, str | None]:
    """Draft a report for an uploaded DICOM image (or PNG); nothing is stored or sent.

    Returns the draft and the upload's SOP Instance UID (``None`` for a PNG); 413 when
    ``data`` is larger than ``max_bytes``.
    """
    gray8, ds = gray8_from_bytes(data, max_bytes=max_bytes)
    with interactive_model(ctx) as runtime:
        draft = draft_report(runtime, gray8)
    sop = str(ds.get("SOPInstanceUID", "")) if ds is not None else None
    _audit(ctx, actor, "model.report", f"sop:{sop}" if sop else None, {"upload": True})
    return draft, sop or None


@dataclass(frozen=True)
class ImageResult:
    """A report -> CXR result, its PNG, and the Secondary Capture when one was built."""

    generated: GeneratedImage
    png: bytes
    sc: Dataset | None
    queued_to: str | None
    delivery_id: int | None = None


def _destination(settings: Settings, name: str) -> DicomDestination | StowDestination:
    for d in settings.destinations:
        if not isinstance(d, DicomDestination | StowDestination):
            continue
        if name in (str(d), getattr(d, "ae_title", None), getattr(d, "url", None)):
            return d
    known = ", ".join(str(d) for d in settings.destinations) or "none configured"
    raise NotConfigured(f"destination {name!r} is not a configured DICOM destination ({known})")


def _reference(ctx: ServiceContext, study_uid: str) -> Dataset:
    from pydicom import dcmread

    with ctx.read_sessions() as session:
        imgs = study_views.study_instances(session, study_uid)
    for _uid, rel in imgs.instances:
        try:
            return dcmread(Path(ctx.settings.spool_dir) / rel, stop_before_pixels=True)
        except Exception:
            continue
    raise InvalidInput(f"study {study_uid} has no readable instance to take patient data from")


def make_image(
    ctx: ServiceContext,
    report: str,
    *,
    actor: str,
    as_dicom: bool,
    seed: int | None = None,
    greedy: bool | None = None,
    study_uid: str | None = None,
    send: bool = False,
    destination: str | None = None,
) -> ImageResult:
    """Report -> CXR (exactly 256 codes, decoded by the VQ-GAN); PNG, and on request a
    synthetic Secondary Capture (:func:`integration.sc.build_synthetic_sc`).

    Never sent anywhere unless ``send`` and ``destination`` (a configured DICOM one) are
    given; then it is queued as a delivery (``sc``, no job) that the delivery worker sends
    with its retries and TLS settings.
    """
    dest = None
    if send:
        if not destination:
            raise InvalidInput("send=true needs a destination")
        dest = _destination(ctx.settings, destination)
    reference = _reference(ctx, study_uid) if study_uid else None
    with interactive_model(ctx) as runtime:
        generated = runtime.generate_image(report, seed=seed, greedy=greedy)
    _observe("image", generated.timings)
    sc = None
    if as_dicom or dest is not None:
        from integration.sc import build_synthetic_sc

        sc = build_synthetic_sc(
            generated.image,
            model_name=generated.model_name,
            model_version=generated.model_version,
            demo=generated.demo,
            reference=reference,
        )
    _audit(
        ctx,
        actor,
        "model.generate_image",
        f"study:{study_uid}" if study_uid else None,
        {"format": "dicom" if as_dicom else "png", "codes": int(generated.codes.size)},
    )
    queued_to = None
    delivery_id = None
    if dest is not None and sc is not None:
        delivery_id = _queue_sc(ctx, sc, dest)
        queued_to = str(dest)
        _audit(
            ctx,
            actor,
            "image.send",
            f"sop:{sc.SOPInstanceUID}",
            {"destination": queued_to, "synthetic": True, "delivery": delivery_id},
        )
    return ImageResult(generated, png_bytes(generated.image), sc, queued_to, delivery_id)


def _queue_sc(ctx: ServiceContext, sc: Dataset, dest: DicomDestination | StowDestination) -> int:
    """Write the synthetic SC to ``outputs/`` (0600) and queue it as a delivery (no job)."""
    from node.db.deliveries import Outbound
    from node.db.models import DeliveryObject
    from node.runtime.delivery import enqueue_deliveries
    from node.runtime.output_files import write_output
    from node.runtime.spool import OUTPUTS_DIR

    uid = str(sc.SOPInstanceUID)
    path = write_output(sc, Path(ctx.settings.spool_dir) / OUTPUTS_DIR, f"{uid}.dcm")
    item = Outbound(dest, DeliveryObject.sc, f"{OUTPUTS_DIR}/{path.name}", uid)
    with ctx.write_sessions() as session:
        return enqueue_deliveries(session, job_id=None, items=[item])[0]


def _audit(
    ctx: ServiceContext,
    actor: str,
    action: str,
    target: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    with ctx.write_sessions() as session:
        audit_db.audit(session, actor=actor, action=action, target=target, detail=detail)
