"""The API's service layer: routes call these; these call repositories and the model.

Every admin action goes through a repository function that writes its audit row in the
same transaction (``job.requeue``, ``job.cancel``, ``job.priority``, ``job.resend``,
``job.withdraw``, ``token.create``, ``token.revoke``); model tasks are audited too (``model.vqa``,
``model.report``, ``model.generate_image``, ``image.send``) with UIDs only, never the question,
the report text or patient data.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from node import metrics
from node.api.auth import Principal, hash_secret, new_token
from node.api.context import ApiContext
from node.api.errors import ApiError
from node.db import audit as audit_db
from node.db import studies as studies_db
from node.db import tokens as tokens_db
from node.db.models import ApiRole
from node.settings import DicomDestination, Settings, StowDestination

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from models.runtime import LLMCXR, Answer, GeneratedImage, ReportDraft
    from node.runtime.outputs import WithdrawResult

__all__ = [
    "ImageResult",
    "answer_question",
    "create_token",
    "draft_report",
    "gray8_from_bytes",
    "gray8_from_file",
    "make_image",
    "png_bytes",
    "readiness",
    "report_for_upload",
    "resend",
    "revoke_token",
    "study_image",
    "vqa_for_study",
    "withdraw",
]

log = logging.getLogger(__name__)

MODEL_WAIT_SECONDS = 120.0
MIB = 1024 * 1024
#: the largest image :func:`gray8_from_bytes` takes by default (uploads: api_max_upload_mb)
MAX_UPLOAD_BYTES = 64 * MIB
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- tokens -------------------------------------------------------------------------------


def create_token(
    ctx: ApiContext, *, name: str, role: ApiRole | str, actor: str
) -> tuple[tokens_db.TokenRow, str]:
    """Create a token; return its row and the secret (shown once, stored hashed)."""
    secret = new_token()
    with ctx.write_sessions() as session:
        row = tokens_db.create_token(
            session, name=name, role=role, token_hash=hash_secret(secret), actor=actor
        )
    return row, secret


def revoke_token(ctx: ApiContext, token_id: int, *, actor: str) -> tokens_db.TokenRow:
    """Revoke a token and end its sessions (audited)."""
    with ctx.write_sessions() as session:
        return tokens_db.revoke_token(session, token_id, actor=actor)


# --- jobs ---------------------------------------------------------------------------------


def resend(ctx: ApiContext, job_id: int, *, principal: Principal) -> list[int]:
    """Send a job's objects again to their destinations (audited ``job.resend``)."""
    from node.db.deliveries import resend as delivery_resend
    from node.runtime.delivery import wake_senders

    with ctx.write_sessions() as session:
        ids = delivery_resend(session, job_id, actor=principal.actor)
    wake_senders()
    return ids


def withdraw(ctx: ApiContext, job_id: int, *, principal: Principal, reason: str) -> WithdrawResult:
    """Withdraw a job's sent draft (:func:`node.runtime.outputs.withdraw`; audited
    ``job.withdraw``)."""
    from node.runtime.outputs import withdraw as withdraw_draft

    return withdraw_draft(
        ctx.settings, ctx.write_sessions, job_id, actor=principal.actor, reason=reason
    )


# --- readiness ----------------------------------------------------------------------------


def readiness(ctx: ApiContext) -> tuple[bool, dict[str, Any]]:
    """Whether the node is ready: model warmed up, database and spool reachable.

    Returns
    -------
    tuple
        ``(ready, checks)`` where ``checks`` maps ``model``, ``database`` and ``spool`` to
        ``{"ok": bool, "reason": str | None, ...}``; the model's also names the model, the
        backend, its quantisation, the engine's version and (llama.cpp) the CPU features of
        its kernels.
    """
    checks: dict[str, Any] = {}
    host = ctx.host()
    if host is None:
        checks["model"] = {"ok": False, "reason": "no model host in this process (model_dir)"}
    else:
        info = host.info()
        reason = None
        if not host.ready:
            reason = host.error or ("model is loading" if info.get("loading") else "not loaded")
        checks["model"] = {
            "ok": bool(host.ready),
            "reason": reason,
            "model_name": info.get("model_name"),
            "model_version": info.get("model_version"),
            "demo": info.get("demo"),
            "backend": info.get("backend"),
            "quant": info.get("quant"),
            "engine_version": info.get("engine_version"),
            "cpu_features": info.get("cpu_features"),
        }
    try:
        from sqlalchemy import text

        with ctx.read_sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True, "reason": None}
    except Exception as exc:
        checks["database"] = {"ok": False, "reason": f"database unreachable: {type(exc).__name__}"}
    checks["spool"] = _spool_check(ctx.settings)
    return all(c["ok"] for c in checks.values()), checks


def _spool_check(settings: Settings) -> dict[str, Any]:
    spool = Path(settings.spool_dir)
    if not spool.is_dir():
        return {"ok": False, "reason": f"spool_dir {spool} does not exist"}
    try:
        free_mb = shutil.disk_usage(spool).free // (1024 * 1024)
    except OSError as exc:
        return {"ok": False, "reason": f"spool_dir {spool} unreadable: {exc.strerror}"}
    import os

    if not os.access(spool, os.W_OK):
        return {"ok": False, "reason": f"spool_dir {spool} is not writable"}
    if free_mb < settings.min_free_disk_mb:
        return {
            "ok": False,
            "reason": f"{free_mb} MB free under spool_dir, below min_free_disk_mb",
        }
    return {"ok": True, "reason": None, "free_mb": int(free_mb)}


# --- images -------------------------------------------------------------------------------


def gray8_from_bytes(
    data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES
) -> tuple[npt.NDArray[np.uint8], Dataset | None]:
    """A DICOM Part 10 file or a PNG -> 8-bit grey image (and the dataset for DICOM).

    DICOM goes through :func:`integration.pixels.to_gray8` (the MIMIC-like conversion); a
    PNG is read as grey as it is (already 8-bit, like MIMIC-CXR-JPG).

    Raises
    ------
    ApiError
        413 when larger than ``max_bytes``; 422 when neither DICOM nor PNG.
    integration.errors.PixelDataError
        When the DICOM pixel data cannot be converted (422).
    """
    if len(data) > max_bytes:
        raise ApiError(413, f"upload larger than {max_bytes // MIB} MiB")
    if data.startswith(_PNG_MAGIC):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(BytesIO(data)) as im:
                return np.asarray(im.convert("L"), dtype=np.uint8), None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ApiError(422, f"PNG cannot be decoded: {type(exc).__name__}") from None
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from integration.pixels import to_gray8

    try:
        ds = dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise ApiError(
            422, f"not a DICOM Part 10 file (PS3.10 preamble + DICM) or PNG: {exc}"
        ) from None
    if "PixelData" not in ds:
        raise ApiError(422, "the DICOM object has no Pixel Data (7FE0,0010): not an image")
    try:
        return to_gray8(ds), ds
    except (ApiError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        if getattr(exc, "http_status", None):
            raise
        raise ApiError(422, f"Pixel Data (7FE0,0010) cannot be converted: {exc}") from None


def gray8_from_file(path: Path) -> tuple[npt.NDArray[np.uint8], Dataset | None]:
    """Like :func:`gray8_from_bytes` for a file on disk (DICOM or PNG)."""
    return gray8_from_bytes(Path(path).read_bytes())


@contextmanager
def _model(ctx: ApiContext) -> Iterator[LLMCXR]:
    host = ctx.host()
    if host is None:
        raise ApiError(503, "no model in this process: set model_dir and run the model host")
    with host.use(timeout=MODEL_WAIT_SECONDS) as runtime:
        yield runtime


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


def study_image(ctx: ApiContext, study_uid: str, sop_instance_uid: str | None) -> StudyImage:
    """Pick the image of a stored study: the one asked for, the one its job selected, or
    the frontal image chosen now (:func:`integration.selection.select_frontal`).

    Raises
    ------
    node.db.studies.StudyNotFound
        404 for an unknown study; :class:`ApiError` 404 for an instance not in the study.
    integration.errors.NoFrontalImageError
        422 when no instance is frontal.
    """
    with ctx.read_sessions() as session:
        imgs = studies_db.study_instances(session, study_uid)
    paths = dict(imgs.instances)
    root = Path(ctx.settings.spool_dir)
    if sop_instance_uid is not None:
        if sop_instance_uid not in paths:
            raise ApiError(
                404, f"SOP Instance UID {sop_instance_uid} is not an instance of study {study_uid}"
            )
        return StudyImage(study_uid, sop_instance_uid, root / paths[sop_instance_uid], "requested")
    chosen = imgs.selected_sop_instance_uid
    if chosen in paths:
        return StudyImage(study_uid, chosen, root / paths[chosen], "selected by job")
    if not paths:
        raise ApiError(422, f"study {study_uid} has no stored instances")
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


def vqa_for_study(
    ctx: ApiContext,
    study_uid: str,
    question: str,
    *,
    sop_instance_uid: str | None,
    principal: Principal,
) -> tuple[Answer, StudyImage]:
    """Answer a question about a stored study's image (audited as ``model.vqa``)."""
    img = study_image(ctx, study_uid, sop_instance_uid)
    try:
        gray8, _ds = gray8_from_file(img.path)
    except FileNotFoundError:
        raise ApiError(410, f"instance {img.sop_instance_uid} is no longer in the spool") from None
    with _model(ctx) as runtime:
        answer = answer_question(runtime, gray8, question)
    _audit(ctx, principal, "model.vqa", f"study:{study_uid}", {"sop": img.sop_instance_uid})
    return answer, img


def report_for_upload(
    ctx: ApiContext, data: bytes, *, principal: Principal, max_bytes: int = MAX_UPLOAD_BYTES
) -> tuple[ReportDraft, str | None]:
    """Draft a report for an uploaded DICOM image (or PNG); nothing is stored or sent.

    Returns the draft and the upload's SOP Instance UID (``None`` for a PNG); 413 when
    ``data`` is larger than ``max_bytes``.
    """
    gray8, ds = gray8_from_bytes(data, max_bytes=max_bytes)
    with _model(ctx) as runtime:
        draft = draft_report(runtime, gray8)
    sop = str(ds.get("SOPInstanceUID", "")) if ds is not None else None
    _audit(ctx, principal, "model.report", f"sop:{sop}" if sop else None, {"upload": True})
    return draft, sop or None


@dataclass(frozen=True)
class ImageResult:
    """A report -> CXR result, its PNG, and the Secondary Capture when one was built."""

    generated: GeneratedImage
    png: bytes
    sc: Dataset | None
    queued_to: str | None
    delivery_id: int | None = None


def png_bytes(image: npt.NDArray[np.uint8]) -> bytes:
    """Encode an 8-bit grey image as PNG."""
    from PIL import Image

    buf = BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _destination(settings: Settings, name: str) -> DicomDestination | StowDestination:
    for d in settings.destinations:
        if not isinstance(d, DicomDestination | StowDestination):
            continue
        if name in (str(d), getattr(d, "ae_title", None), getattr(d, "url", None)):
            return d
    known = ", ".join(str(d) for d in settings.destinations) or "none configured"
    raise ApiError(422, f"destination {name!r} is not a configured DICOM destination ({known})")


def _reference(ctx: ApiContext, study_uid: str) -> Dataset:
    from pydicom import dcmread

    with ctx.read_sessions() as session:
        imgs = studies_db.study_instances(session, study_uid)
    for _uid, rel in imgs.instances:
        try:
            return dcmread(Path(ctx.settings.spool_dir) / rel, stop_before_pixels=True)
        except Exception:
            continue
    raise ApiError(422, f"study {study_uid} has no readable instance to take patient data from")


def make_image(
    ctx: ApiContext,
    report: str,
    *,
    principal: Principal,
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
            raise ApiError(422, "send=true needs a destination")
        dest = _destination(ctx.settings, destination)
    reference = _reference(ctx, study_uid) if study_uid else None
    with _model(ctx) as runtime:
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
        principal,
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
            principal,
            "image.send",
            f"sop:{sc.SOPInstanceUID}",
            {"destination": queued_to, "synthetic": True, "delivery": delivery_id},
        )
    return ImageResult(generated, png_bytes(generated.image), sc, queued_to, delivery_id)


def _queue_sc(ctx: ApiContext, sc: Dataset, dest: DicomDestination | StowDestination) -> int:
    """Write the synthetic SC to ``outputs/`` (0600) and queue it as a delivery (no job)."""
    from node.db.deliveries import Outbound
    from node.db.models import DeliveryObject
    from node.runtime.delivery import enqueue_deliveries
    from node.runtime.outputs import write_output
    from node.runtime.spool import OUTPUTS_DIR

    uid = str(sc.SOPInstanceUID)
    path = write_output(sc, Path(ctx.settings.spool_dir) / OUTPUTS_DIR, f"{uid}.dcm")
    item = Outbound(dest, DeliveryObject.sc, f"{OUTPUTS_DIR}/{path.name}", uid)
    with ctx.write_sessions() as session:
        return enqueue_deliveries(session, job_id=None, items=[item])[0]


def _audit(
    ctx: ApiContext,
    principal: Principal,
    action: str,
    target: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    with ctx.write_sessions() as session:
        audit_db.audit(session, actor=principal.actor, action=action, target=target, detail=detail)
