"""The draft's outbound objects: one file per object, written before it is queued.

After the worker writes the Comprehensive SR, :func:`build_outputs` makes what each
configured destination gets (:mod:`integration.destinations`) and returns one
:class:`~node.db.deliveries.Outbound` per (destination, object):

- DICOM destinations (DIMSE C-STORE or STOW-RS), per their ``objects``: ``sr`` the
  Comprehensive SR (TID 2000), ``basic-sr`` a Basic Text SR of the same text, ``pdf`` the AI
  DRAFT Encapsulated PDF (PS3.3 A.45.1) in its own series of the same study;
- HL7 destinations: an ORU^R01 (v2.5.1, OBR-25/OBX-11 ``R``: results stored, not yet
  verified) per destination (its MSH-5/6 and MSH-10 differ), ``report``;
- FHIR destinations: one transaction Bundle (Device, DiagnosticReport ``partial``, R4's
  status for a report that may be unverified, with the PDF as ``presentedForm``,
  Provenance), ``report``.

:func:`withdraw` withdraws a sent draft: it marks the job (audited), cancels what was not
sent, and queues a ``withdrawal`` to each destination the draft may have reached: an IHE
IOCM Key Object Selection rejection note (DICOM), an ORU with OBR-25 ``C``/OBX-11 ``W``
(HL7), the report ``entered-in-error`` (FHIR).

Every file is written under ``<spool>/outputs`` durably (temporary file, fsync, rename,
fsync of the folder) and privately (0600): it carries patient data. Object UIDs are derived
from the content (:mod:`integration.uids`), so a re-run with the same text rebuilds the same
objects. Logs name jobs, objects and UIDs, never text or patient data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from integration.destinations import (
    DicomDestination,
    FhirDestination,
    Hl7Destination,
    StowDestination,
    parse_destination,
)
from integration.encapsulated_pdf import build_encapsulated_pdf
from integration.fhir_report import FhirDraft, build_draft_bundle, build_withdrawal_bundle
from integration.hl7_oru import (
    DraftResult,
    Hl7Parties,
    build_draft_oru,
    build_withdrawal_oru,
    message_control_id,
)
from integration.kos import build_rejection_note
from integration.report_pdf import DraftReportContent, render_report_pdf, report_header_from
from integration.sr import build_draft_sr, requested_procedures_from
from integration.uids import draft_instance_uid, draft_series_number, draft_series_uid
from node import __version__ as node_version
from node.db import withdrawals as withdrawals_db
from node.db.deliveries import Outbound
from node.db.models import DeliveryObject, Draft, Instance, Job
from node.filemodes import make_private_dir, open_private
from node.runtime.spool import OUTPUTS_DIR
from node.settings import Settings

__all__ = [
    "MANUFACTURER",
    "DraftText",
    "WithdrawResult",
    "build_outputs",
    "withdraw",
    "write_output",
]

log = logging.getLogger(__name__)

MANUFACTURER = "llm-cxr-node"
SOFTWARE = f"llm-cxr-node {node_version}"
AnyDestination = DicomDestination | StowDestination | Hl7Destination | FhirDestination


@dataclass(frozen=True)
class DraftText:
    """The draft as every output carries it (from the model's draft or the stored row)."""

    findings: str | None
    impression: str
    model_name: str
    model_version: str
    demo: bool
    created_at: dt.datetime

    @property
    def as_sent(self) -> str:
        """Findings and impression as one text (what the object UIDs are derived from)."""
        return f"{(self.findings or '').strip()}\x1f{self.impression.strip()}"


# --- files -----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_output(
    data: bytes | Dataset,
    outputs_dir: Path,
    name: str,
    *,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Write ``data`` durably and privately to ``<outputs_dir>/<name>`` (replacing).

    A temporary file in the same folder (0600), ``fsync``, ``before_rename()`` (e.g. a
    lease check that raises), atomic ``os.replace``, ``fsync`` of the folder (created 0700
    when missing, :mod:`node.filemodes`). A :class:`~pydicom.dataset.Dataset` is written
    as a DICOM Part 10 file (PS3.10 §7).
    """
    make_private_dir(outputs_dir)
    final = outputs_dir / name
    tmp = outputs_dir / f".{name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open_private(tmp) as fh:
            if isinstance(data, Dataset):
                data.save_as(fh, enforce_file_format=True)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, final)
        _fsync_dir(outputs_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _relative(path: Path) -> str:
    return f"{OUTPUTS_DIR}/{path.name}"


def _short(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# --- building ------------------------------------------------------------------------------


def _parties(settings: Settings, dest: Hl7Destination) -> Hl7Parties:
    return Hl7Parties(
        sending_application=settings.hl7_sending_application,
        sending_facility=settings.hl7_sending_facility,
        receiving_application=dest.receiving_application,
        receiving_facility=dest.receiving_facility,
    )


def _hl7_result(text: DraftText) -> DraftResult:
    return DraftResult(
        impression=text.impression,
        findings=text.findings,
        model_name=text.model_name,
        model_version=text.model_version,
        demo=text.demo,
        report_time=text.created_at,
        manufacturer=MANUFACTURER,
    )


def _fhir_draft(text: DraftText, sr_uid: str, pdf: bytes | None, issued: dt.datetime) -> FhirDraft:
    return FhirDraft(
        sr_sop_instance_uid=sr_uid,
        impression=text.impression,
        findings=text.findings,
        model_name=text.model_name,
        model_version=text.model_version,
        demo=text.demo,
        issued=issued,
        pdf=pdf,
        manufacturer=MANUFACTURER,
    )


def _pdf_bytes(image_read: Dataset, text: DraftText) -> bytes:
    return render_report_pdf(
        DraftReportContent(
            header=report_header_from(image_read),
            impression=text.impression,
            findings=text.findings,
            model_name=text.model_name,
            model_version=text.model_version,
            demo=text.demo,
            generated_at=text.created_at,
            software_version=node_version,
        )
    )


class _Builder:
    """Builds each object once, however many destinations get it."""

    def __init__(
        self,
        settings: Settings,
        outputs_dir: Path,
        *,
        sr: Dataset,
        sr_path: Path,
        image_read: Dataset,
        evidence: Sequence[Dataset],
        text: DraftText,
        before_rename: Callable[[], None] | None,
    ) -> None:
        self.settings = settings
        self.outputs_dir = outputs_dir
        self.sr = sr
        self.sr_uid = str(sr.SOPInstanceUID)
        self.sr_path = sr_path
        self.image_read = image_read
        self.evidence = list(evidence) or [image_read]
        self.text = text
        self.before_rename = before_rename
        self.study_uid = str(image_read.StudyInstanceUID)
        self._files: dict[str, tuple[Path, str]] = {}
        self._pdf: bytes | None = None

    def _uid(self, kind: str) -> str:
        t = self.text
        inputs = [str(ds.SOPInstanceUID) for ds in self.evidence]
        return draft_instance_uid(
            kind, self.study_uid, t.model_name, t.model_version, inputs=inputs, text=t.as_sent
        )

    def _write(self, key: str, data: bytes | Dataset, name: str, uid: str) -> tuple[Path, str]:
        if key not in self._files:
            path = write_output(data, self.outputs_dir, name, before_rename=self.before_rename)
            self._files[key] = (path, uid)
        return self._files[key]

    def pdf(self) -> bytes:
        if self._pdf is None:
            self._pdf = _pdf_bytes(self.image_read, self.text)
        return self._pdf

    def dicom(self, obj: str) -> tuple[Path, str]:
        t = self.text
        if obj == "sr":
            return self.sr_path, self.sr_uid
        if obj in self._files:
            return self._files[obj]
        kind = "sr-basic" if obj == "basic-sr" else "pdf"
        uid = self._uid(kind)
        series_uid = draft_series_uid(kind, self.study_uid, t.model_name, t.model_version)
        series_number = draft_series_number(kind, t.model_name, t.model_version)
        if obj == "basic-sr":
            ds = build_draft_sr(
                evidence=self.evidence,
                image_read=self.image_read,
                findings=t.findings,
                impression=t.impression,
                algorithm_name=t.model_name,
                algorithm_version=t.model_version,
                manufacturer=MANUFACTURER,
                software_version=SOFTWARE,
                demo=t.demo,
                sop_instance_uid=uid,
                series_instance_uid=series_uid,
                series_number=series_number,
                kind="basic",
                created_at=t.created_at,
                requested_procedures=requested_procedures_from(self.image_read) or None,
            )
        else:
            ds = build_encapsulated_pdf(
                self.pdf(),
                source=self.image_read,
                sop_instance_uid=uid,
                series_instance_uid=series_uid,
                series_number=series_number,
                created_at=t.created_at,
                algorithm_name=t.model_name,
                algorithm_version=t.model_version,
                demo=t.demo,
                manufacturer=MANUFACTURER,
                software_version=SOFTWARE,
            )
        return self._write(obj, ds, f"{uid}.dcm", uid)

    def hl7(self, dest: Hl7Destination) -> tuple[Path, str]:
        control_id = message_control_id(self.sr_uid, "draft", str(dest))
        message = build_draft_oru(
            self.image_read,
            _hl7_result(self.text),
            _parties(self.settings, dest),
            control_id=control_id,
        )
        name = f"{self.sr_uid}.{_short(str(dest))}.hl7"
        return self._write(f"hl7:{dest}", message.encode("utf-8"), name, control_id)

    def fhir(self) -> tuple[Path, str]:
        bundle = build_draft_bundle(
            self.image_read,
            _fhir_draft(self.text, self.sr_uid, self.pdf(), self.text.created_at),
        )
        data = json.dumps(bundle, ensure_ascii=False).encode("utf-8")
        return self._write("fhir", data, f"{self.sr_uid}.fhir.json", self.sr_uid)


def build_outputs(
    settings: Settings,
    outputs_dir: Path,
    *,
    sr: Dataset,
    sr_path: Path,
    image_read: Dataset,
    evidence: Sequence[Dataset],
    text: DraftText,
    before_rename: Callable[[], None] | None = None,
) -> list[Outbound]:
    """Build and write what each configured destination gets (see the module text).

    Parameters
    ----------
    settings
        ``destinations`` and the HL7 sending application/facility.
    outputs_dir
        ``<spool>/outputs``.
    sr, sr_path
        The Comprehensive SR as written.
    image_read
        The header of the image the model read (patient, study and order fields).
    evidence
        Headers of every instance of the study.
    text
        The draft.
    before_rename
        Called before each file is renamed into place (a lease check that raises).

    Returns
    -------
    list[Outbound]
        One per (destination, object), paths relative to the spool.

    Raises
    ------
    integration.errors.IntegrationError
        An object cannot be built from this draft (a permanent failure of the job).
    """
    builder = _Builder(
        settings,
        outputs_dir,
        sr=sr,
        sr_path=sr_path,
        image_read=image_read,
        evidence=evidence,
        text=text,
        before_rename=before_rename,
    )
    out: list[Outbound] = []
    for dest in settings.destinations:
        if isinstance(dest, DicomDestination | StowDestination):
            for obj in dest.objects:
                path, uid = builder.dicom(obj)
                out.append(Outbound(dest, DeliveryObject(obj), _relative(path), uid))
        elif isinstance(dest, Hl7Destination):
            path, uid = builder.hl7(dest)
            out.append(Outbound(dest, DeliveryObject.report, _relative(path), uid))
        else:
            path, uid = builder.fhir()
            out.append(Outbound(dest, DeliveryObject.report, _relative(path), uid))
    return out


# --- withdrawal ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WithdrawResult:
    """What a withdrawal did: rows cancelled, withdrawals queued, destinations skipped."""

    job_id: int
    cancelled: list[int]
    queued: list[int]
    skipped: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "job_id": self.job_id,
            "cancelled": self.cancelled,
            "queued": self.queued,
            "skipped": self.skipped,
        }


def _configured(settings: Settings, text: str) -> AnyDestination:
    for dest in settings.destinations:
        if str(dest) == text:
            return dest
    return parse_destination(text)


def _read_header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError):
        return None


def _source_and_text(
    session: Session, settings: Settings, job: Job
) -> tuple[Dataset | None, DraftText | None]:
    draft = session.scalars(
        select(Draft).where(Draft.job_id == job.id).order_by(Draft.id.desc()).limit(1)
    ).first()
    text = None
    if draft is not None:
        text = DraftText(
            findings=draft.findings,
            impression=(draft.impression or draft.full_text or "").strip() or "(no text)",
            model_name=draft.model_name,
            model_version=draft.model_version,
            demo=draft.demo,
            created_at=draft.created_at,
        )
    source = None
    if job.selected_sop_instance_uid:
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == job.selected_sop_instance_uid)
        ).first()
        if instance is not None:
            source = _read_header(Path(settings.spool_dir) / instance.spool_path)
    if source is None and job.sr_sop_instance_uid:  # the image was purged: the SR has it all
        source = _read_header(
            Path(settings.spool_dir) / OUTPUTS_DIR / f"{job.sr_sop_instance_uid}.dcm"
        )
    return source, text


def withdraw(
    settings: Settings,
    session_factory: Callable[[], Session],
    job_id: int,
    *,
    actor: str,
    reason: str,
) -> WithdrawResult:
    """Withdraw a job's draft: mark it, cancel unsent objects, queue the withdrawals.

    Parameters
    ----------
    settings
        For destination options and the spool.
    session_factory
        Write sessions.
    job_id
        A ``done`` job not withdrawn yet.
    actor
        Who withdraws (audited).
    reason
        Why (sent to the receivers; no patient data), 1-256 characters.

    Returns
    -------
    WithdrawResult
        ``skipped`` names destinations no withdrawal could be built for, with the reason.

    Raises
    ------
    node.db.jobs.JobNotFound, node.db.jobs.JobConflict, ValueError
        From :func:`node.db.withdrawals.withdraw_job`.
    """
    now = dt.datetime.now(dt.UTC)
    with session_factory() as session:
        done = withdrawals_db.withdraw_job(session, job_id, actor=actor, reason=reason)
        job = session.get(Job, job_id)
        assert job is not None
        source, text = _source_and_text(session, settings, job)
        sr_uid = job.sr_sop_instance_uid or ""
    outputs_dir = Path(settings.spool_dir) / OUTPUTS_DIR
    reason = reason.strip()
    items: list[Outbound] = []
    skipped: dict[str, str] = {}
    kos_cache: dict[frozenset[str], tuple[Path, str]] = {}
    for text_dest, rows in done.reached.items():
        dest = _configured(settings, text_dest)
        try:
            if isinstance(dest, DicomDestination | StowDestination):
                headers = [
                    h
                    for _obj, rel, _uid in rows
                    if rel and (h := _read_header(Path(settings.spool_dir) / rel)) is not None
                ]
                if not headers:
                    skipped[text_dest] = "the objects sent are no longer in outputs/"
                    continue
                key = frozenset(str(h.SOPInstanceUID) for h in headers)
                if key not in kos_cache:
                    kos_cache[key] = _write_kos(outputs_dir, headers, reason, text)
                path, uid = kos_cache[key]
            elif source is None or text is None:
                skipped[text_dest] = "neither the image read nor the SR is left to build from"
                continue
            elif isinstance(dest, Hl7Destination):
                control_id = message_control_id(sr_uid, "withdraw", str(dest))
                message = build_withdrawal_oru(
                    source,
                    _hl7_result(text),
                    _parties(settings, dest),
                    control_id=control_id,
                    reason=reason,
                )
                name = f"{sr_uid}.{_short(str(dest))}.withdraw.hl7"
                path = write_output(message.encode("utf-8"), outputs_dir, name)
                uid = control_id
            else:
                bundle = build_withdrawal_bundle(
                    source, _fhir_draft(text, sr_uid, None, now), reason=reason
                )
                data = json.dumps(bundle, ensure_ascii=False).encode("utf-8")
                path = write_output(data, outputs_dir, f"{sr_uid}.withdraw.fhir.json")
                uid = sr_uid
        except Exception as exc:  # built from stored data: name the class, not the content
            log.error(
                "job %s: withdrawal for %s not built: %s", job_id, text_dest, type(exc).__name__
            )
            skipped[text_dest] = f"not built: {type(exc).__name__}: {exc}"
            continue
        items.append(Outbound(dest, DeliveryObject.withdrawal, _relative(path), uid))
    queued: list[int] = []
    if items:
        from node.runtime.delivery import enqueue_deliveries  # also wakes this process's senders

        with session_factory() as session:
            queued = enqueue_deliveries(session, job_id=job_id, items=items)
    log.info(
        "job %s: draft withdrawn by %s: %d unsent object(s) cancelled, %d withdrawal(s) queued",
        job_id,
        actor,
        len(done.cancelled),
        len(queued),
    )
    return WithdrawResult(job_id, done.cancelled, queued, skipped)


def _write_kos(
    outputs_dir: Path, headers: Sequence[Dataset], reason: str, text: DraftText | None
) -> tuple[Path, str]:
    """The IOCM rejection note of ``headers`` (one study), written to ``outputs_dir``."""
    study_uid = str(headers[0].StudyInstanceUID)
    model = text.model_name if text is not None else MANUFACTURER
    version = text.model_version if text is not None else node_version
    withdrawn = [str(h.SOPInstanceUID) for h in headers]
    uid = draft_instance_uid("kos", study_uid, model, version, inputs=withdrawn, text=reason)
    demo = text.demo if text is not None else False
    note = build_rejection_note(
        headers,
        sop_instance_uid=uid,
        series_instance_uid=draft_series_uid("kos", study_uid, model, version),
        series_number=draft_series_number("kos", model, version),
        manufacturer=MANUFACTURER,
        reason=reason,
        demo=demo,
    )
    return write_output(note, outputs_dir, f"{uid}.dcm"), uid
