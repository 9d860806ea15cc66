"""What a job sent: its DICOM objects, to download, and its SR rendered for reading.

A job's objects are its draft SR (``outputs/<SR SOP Instance UID>.dcm``) and every other
file its deliveries recorded (Basic Text SR, coded SR, Encapsulated PDF, IOCM rejection
KOS, ...). Only DICOM Part 10 files (PS3.10 §7.1: ``DICM`` after the preamble) lying under
the spool are served; the files hold patient data, so the routes that serve them send
``Cache-Control: no-store``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from integration.encapsulated_pdf import extract_pdf
from integration.errors import EncapsulatedPdfError
from integration.sr_tree import SrDocument, read_sr
from node.db.models import Delivery, Job
from node.services.context import ServiceContext
from node.services.errors import Gone, InvalidInput, NotFound
from node.spool_layout import draft_sr_path

__all__ = ["JobObject", "job_objects", "object_dataset", "object_file", "pdf_bytes", "sr_document"]


@dataclass(frozen=True)
class JobObject:
    """One file a job made: ``key`` names it in URLs (``sr``, or the delivery id),
    ``object`` its kind (``sr``, ``basic-sr``, ``coded-sr``, ``pdf``, ``withdrawal``, ``sc``),
    ``present`` whether the file is still stored (retention may have removed it)."""

    key: str
    object: str
    uid: str | None
    path: Path
    present: bool
    size: int | None


def _inside(root: Path, relative: str) -> Path | None:
    path = Path(relative)
    path = path if path.is_absolute() else root / path
    try:
        resolved = path.resolve()
        resolved.relative_to(root.resolve())
    except (OSError, ValueError):
        return None
    return resolved


def _is_part10(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def job_objects(ctx: ServiceContext, job_id: int) -> list[JobObject]:
    """The job's DICOM objects, the draft SR first, each file once.

    Raises
    ------
    NotFound
        No job has that id.
    """
    root = Path(ctx.settings.spool_dir)
    with ctx.read_sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        sr_uid = job.sr_sop_instance_uid
        rows = session.execute(
            select(Delivery.id, Delivery.object, Delivery.object_uid, Delivery.sr_path)
            .where(Delivery.job_id == job_id, Delivery.sr_path.is_not(None))
            .order_by(Delivery.id)
        ).all()
    candidates: list[tuple[str, str, str | None, str]] = []
    if sr_uid:
        candidates.append(("sr", "sr", sr_uid, draft_sr_path(sr_uid)))
    candidates += [(str(i), o.value, uid, str(p)) for i, o, uid, p in rows]
    out: list[JobObject] = []
    seen: set[Path] = set()
    for key, kind, uid, relative in candidates:
        path = _inside(root, relative)
        if path is None or path in seen:
            continue
        seen.add(path)
        present = path.is_file()
        if present and not _is_part10(path):
            continue  # an HL7 or FHIR message file: not a DICOM object
        out.append(
            JobObject(key, kind, uid, path, present, path.stat().st_size if present else None)
        )
    return out


def object_file(ctx: ServiceContext, job_id: int, key: str) -> JobObject:
    """One of the job's objects, present on disk.

    Raises
    ------
    NotFound
        No such job or object.
    Gone
        The file was removed (retention).
    """
    for obj in job_objects(ctx, job_id):
        if obj.key == key:
            if not obj.present:
                raise Gone(f"the {obj.object} object of job {job_id} is no longer stored")
            return obj
    raise NotFound(f"job {job_id} has no object {key!r}")


def object_dataset(ctx: ServiceContext, job_id: int, key: str) -> tuple[JobObject, Dataset]:
    """The object and its data set (read whole: the node's own objects are small)."""
    obj = object_file(ctx, job_id, key)
    return obj, dcmread(obj.path)


def sr_document(ctx: ServiceContext, job_id: int, key: str = "sr") -> SrDocument:
    """The SR object ``key`` of the job, read for display.

    Raises
    ------
    InvalidInput
        The object is not an SR document.
    """
    _obj, ds = object_dataset(ctx, job_id, key)
    try:
        return read_sr(ds)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


def pdf_bytes(ctx: ServiceContext, job_id: int, key: str) -> bytes:
    """The PDF inside the job's Encapsulated PDF object ``key``
    (:func:`integration.encapsulated_pdf.extract_pdf`, PS3.3 C.24.2).

    Raises
    ------
    InvalidInput
        The object is not an Encapsulated PDF.
    """
    _obj, ds = object_dataset(ctx, job_id, key)
    try:
        return extract_pdf(ds)
    except EncapsulatedPdfError as exc:
        raise InvalidInput(f"object {key!r} of job {job_id}: {exc}") from exc
