"""Withdrawing a sent draft: mark the job, cancel what was not sent, queue the withdrawals.

:func:`withdraw` marks the job withdrawn (audited, :func:`node.db.withdrawals.withdraw_job`),
cancels its objects not yet sent, and queues a ``withdrawal`` to each destination the draft
may have reached:

- DICOM (DIMSE or STOW-RS): an IHE IOCM Key Object Selection rejection note (PS3.3 A.59,
  :func:`integration.kos.build_rejection_note`) of the objects sent there, one per set of
  objects;
- HL7: the ORU^R01 again with OBR-25 ``C`` and OBX-11 ``W`` (HL7 v2.5.1 §7.4.1,
  :func:`integration.hl7_oru.build_withdrawal_oru`), except where a later job's draft of
  the study replaced this one's result for the order (its ORU^R01 was sent), which ``W``
  would mark wrong; where that ORU^R01 is still to be sent, the withdrawal is queued held
  back (:func:`node.db.superseded.hold_order_withdrawals`), and goes out if it never
  replaces this result;
- FHIR: the DiagnosticReport updated to ``entered-in-error`` (FHIR R4 DiagnosticReport.status,
  :func:`integration.fhir_withdrawal.build_withdrawal_bundle`).

The HL7 and FHIR withdrawals are built from the stored draft and the image read (or the SR
when the image was purged, or replaced with another patient or accession: the withdrawal
names the record the draft went to). Files are written like every output
(:func:`node.runtime.output_files.write_output`). Logs name jobs, destinations and exception
classes, never text or patient data.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from integration.destinations import (
    Destination,
    DicomDestination,
    Hl7Destination,
    StowDestination,
)
from integration.fhir_withdrawal import build_withdrawal_bundle
from integration.header_values import header_text
from integration.hl7_oru import build_withdrawal_oru, message_control_id
from integration.kos import build_rejection_note
from node import __version__ as node_version
from node.db import withdrawals as withdrawals_db
from node.db.deliveries import Outbound
from node.db.models import Delivery, DeliveryObject, DeliveryState, Draft, Instance, Job
from node.db.superseded import order_replaced, order_replacing
from node.runtime.draft_objects import (
    MANUFACTURER,
    DraftText,
    draft_ids,
    fhir_draft,
    hl7_parties,
    hl7_result,
    impression_text,
)
from node.runtime.output_files import short_digest, spool_relative, write_output
from node.runtime.sending import configured_destination
from node.runtime.spool import OUTPUTS_DIR
from node.settings import Settings

__all__ = ["WithdrawResult", "queue_withdrawals", "withdraw"]

# withdrawals are output objects: they log under the outputs' name
log = logging.getLogger("node.runtime.outputs")

#: the rows of one destination: (object, file relative to the spool, object UID)
_Rows = Sequence[tuple[DeliveryObject, str, str | None]]


@dataclass(frozen=True)
class WithdrawResult:
    """What a withdrawal did: rows cancelled, withdrawals queued, destinations skipped, and
    HL7 withdrawals held back."""

    job_id: int
    cancelled: list[int]
    queued: list[int]
    skipped: dict[str, str]
    #: the study's other jobs whose draft was the same SR, withdrawn with it
    same_draft: list[int] = field(default_factory=list)
    #: the study's earlier drafts this one superseded, withdrawn with it (newest first)
    superseded: list[WithdrawResult] = field(default_factory=list)
    #: HL7 destination -> the later job whose result, still to be sent there, holds this
    #: draft's withdrawal back (queued ``cancelled``: it goes out if that result is
    #: withdrawn before it was sent, or refused at its first attempt)
    held: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


class _Skip(Exception):
    """No withdrawal can be built for a destination; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read_header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError):
        return None


def _stored_text(session: Session, job: Job) -> DraftText | None:
    """The job's latest stored draft, as the withdrawals carry it."""
    draft = session.scalars(
        select(Draft).where(Draft.job_id == job.id).order_by(Draft.id.desc()).limit(1)
    ).first()
    if draft is None:
        return None
    return DraftText(
        findings=draft.findings,
        impression=impression_text(draft.impression, draft.full_text),
        model_name=draft.model_name,
        model_version=draft.model_version,
        demo=draft.demo,
        created_at=draft.created_at,
    )


#: what names the patient and the order in the draft's objects (PS3.3 C.7.1.1, C.7.2.1)
_IDENTITY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyInstanceUID",
)


def _same_identity(image: Dataset, sr: Dataset) -> bool:
    """Whether the image read still names the patient and the order the draft SR names."""
    return all(header_text(image, k) == header_text(sr, k) for k in _IDENTITY)


def _source(session: Session, settings: Settings, job: Job) -> Dataset | None:
    """What the HL7 and FHIR withdrawals are built from: the header of the image read while
    it names the patient and order the draft SR names, else the SR's (the image was purged,
    or replaced with other demographics: the withdrawal goes to the record the draft went
    to, not to the corrected one); ``None`` when neither is left."""
    image = None
    if job.selected_sop_instance_uid:
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == job.selected_sop_instance_uid)
        ).first()
        if instance is not None:
            image = _read_header(Path(settings.spool_dir) / instance.spool_path)
    sr = None
    if job.sr_sop_instance_uid:
        sr = _read_header(Path(settings.spool_dir) / OUTPUTS_DIR / f"{job.sr_sop_instance_uid}.dcm")
    if image is not None and (sr is None or _same_identity(image, sr)):
        return image
    return sr


@dataclass
class _Withdrawals:
    """Builds the withdrawal objects of one draft and writes them to ``outputs_dir``."""

    settings: Settings
    outputs_dir: Path
    reason: str
    sr_uid: str
    source: Dataset | None
    text: DraftText | None
    now: dt.datetime
    _notes: dict[frozenset[str], tuple[Path, str]] = field(default_factory=dict)

    def build(self, dest: Destination, rows: _Rows) -> tuple[Path, str]:
        """The withdrawal for ``dest`` (file, object UID); raises :class:`_Skip`."""
        if isinstance(dest, DicomDestination | StowDestination):
            return self.rejection_note(rows)
        if self.source is None or self.text is None:
            raise _Skip("neither the image read nor the SR is left to build from")
        if isinstance(dest, Hl7Destination):
            return self.oru(dest, self.source, self.text)
        return self.bundle(self.source, self.text)

    def rejection_note(self, rows: _Rows) -> tuple[Path, str]:
        """The IOCM rejection note of the objects sent (one per set of objects)."""
        spool = Path(self.settings.spool_dir)
        headers = [
            h for _obj, rel, _uid in rows if rel and (h := _read_header(spool / rel)) is not None
        ]
        if not headers:
            raise _Skip("the objects sent are no longer in outputs/")
        key = frozenset(str(h.SOPInstanceUID) for h in headers)
        if key not in self._notes:
            self._notes[key] = _write_kos(
                self.outputs_dir, headers, self.reason, self.text, self.now
            )
        return self._notes[key]

    def oru(self, dest: Hl7Destination, source: Dataset, text: DraftText) -> tuple[Path, str]:
        """The ORU^R01 with OBR-25 ``C`` / OBX-11 ``W`` for ``dest``, and its MSH-10."""
        control_id = message_control_id(self.sr_uid, "withdraw", str(dest))
        message = build_withdrawal_oru(
            source,
            hl7_result(text),
            hl7_parties(self.settings, dest),
            control_id=control_id,
            reason=self.reason,
        )
        name = f"{self.sr_uid}.{short_digest(str(dest))}.withdraw.hl7"
        return write_output(message.encode("utf-8"), self.outputs_dir, name), control_id

    def bundle(self, source: Dataset, text: DraftText) -> tuple[Path, str]:
        """The FHIR Bundle marking the report ``entered-in-error``."""
        draft = fhir_draft(text, self.sr_uid, None, self.now)
        bundle = build_withdrawal_bundle(source, draft, reason=self.reason)
        data = json.dumps(bundle, ensure_ascii=False).encode("utf-8")
        name = f"{self.sr_uid}.withdraw.fhir.json"
        return write_output(data, self.outputs_dir, name), self.sr_uid


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
        ``skipped`` names destinations no withdrawal could be built for, or, over HL7, whose
        order a later job's draft went to since (its result replaced this one's there), with
        the reason; ``held`` the HL7 destinations where a later job's result is still to be
        sent, with that job.

    Raises
    ------
    node.db.jobs.JobNotFound, node.db.jobs.JobConflict, ValueError
        From :func:`node.db.withdrawals.withdraw_job`.
    """
    with session_factory() as session:
        done = withdrawals_db.withdraw_job(session, job_id, actor=actor, reason=reason)
    return queue_withdrawals(settings, session_factory, done, actor=actor)


def queue_withdrawals(
    settings: Settings,
    session_factory: Callable[[], Session],
    done: withdrawals_db.Withdrawal,
    *,
    actor: str,
) -> WithdrawResult:
    """Build and queue the withdrawals of what :func:`node.db.withdrawals.withdraw_job` (or
    :func:`node.db.withdrawals.finish_job`) withdrew: each draft's, to each destination it
    reached, with ``done.reason``; logged as withdrawn by ``actor``. See :func:`withdraw`."""
    now = dt.datetime.now(dt.UTC)
    with session_factory() as session:
        drafts = [(each, *_plan(session, settings, each, now)) for each in (done, *done.superseded)]
    withdrawing = {j for each in (done, *done.superseded) for j in (each.job_id, *each.same_draft)}
    results = [
        _queue_withdrawals(settings, session_factory, each, builder, replaced, withdrawing)
        for each, builder, replaced in drafts
    ]
    result = replace(results[0], superseded=results[1:])
    log.info(
        "job %s: draft withdrawn by %s (with job(s) %s, the same draft; and job(s) %s, the "
        "earlier drafts it superseded): %d unsent object(s) cancelled, %d withdrawal(s) queued",
        done.job_id,
        actor,
        ", ".join(map(str, done.same_draft)) or "none",
        ", ".join(str(r.job_id) for r in result.superseded) or "none",
        sum(len(r.cancelled) for r in results),
        sum(len(r.queued) for r in results),
    )
    return result


def _plan(
    session: Session, settings: Settings, done: withdrawals_db.Withdrawal, now: dt.datetime
) -> tuple[_Withdrawals, dict[str, int]]:
    """The builder of one draft's withdrawals (its SR UID, the header naming the patient
    and order, :func:`_source`, and its stored text), and the destinations where a later
    draft of the study replaced its result for the order
    (:func:`node.db.superseded.order_replaced`)."""
    job = session.get(Job, done.job_id)
    assert job is not None
    builder = _Withdrawals(
        settings,
        Path(settings.spool_dir) / OUTPUTS_DIR,
        done.reason,
        job.sr_sop_instance_uid or "",
        _source(session, settings, job),
        _stored_text(session, job),
        now,
    )
    replaced = order_replaced(session, done.job_id, list(done.reached), besides=done.same_draft)
    return builder, replaced


def _queue_withdrawals(
    settings: Settings,
    session_factory: Callable[[], Session],
    done: withdrawals_db.Withdrawal,
    builder: _Withdrawals,
    replaced: dict[str, int],
    withdrawing: Collection[int],
) -> WithdrawResult:
    """Build and queue one draft's withdrawal to each destination it reached; skip an HL7
    destination in ``replaced`` (by a later job: when it is one of ``withdrawing``, the
    jobs this withdrawal takes, that job's own withdrawal goes there), and one no
    withdrawal can be built for. The queue holds back an HL7 one a later result still to
    be sent will replace (:func:`node.db.superseded.hold_order_withdrawals`)."""
    items: list[Outbound] = []
    skipped: dict[str, str] = {}
    for text_dest, rows in done.reached.items():
        dest = configured_destination(settings, text_dest)
        if isinstance(dest, Hl7Destination) and text_dest in replaced:
            # HL7 v2 results are the order's: the later draft's ORU^R01 replaced this one's,
            # and OBX-11 "W" for the order would mark the newer result wrong (section 7.4.1)
            later = replaced[text_dest]
            skipped[text_dest] = f"job {later}'s later draft replaced this one for the order " + (
                f"there, and job {later}'s withdrawal goes there"
                if later in withdrawing
                else "there: a withdrawal would mark the newer result wrong"
            )
            continue
        try:
            path, uid = builder.build(dest, rows)
        except _Skip as skip:
            skipped[text_dest] = skip.reason
            continue
        except Exception as exc:  # built from stored data: name the class, not the content
            log.error(
                "job %s: withdrawal for %s not built: %s",
                done.job_id,
                text_dest,
                type(exc).__name__,
            )
            skipped[text_dest] = f"not built: {type(exc).__name__}: {exc}"
            continue
        items.append(Outbound(dest, DeliveryObject.withdrawal, spool_relative(path), uid))
    queued, held = _enqueue(session_factory, done.job_id, items)
    return WithdrawResult(done.job_id, done.cancelled, queued, skipped, done.same_draft, held=held)


def _enqueue(
    session_factory: Callable[[], Session], job_id: int, items: Sequence[Outbound]
) -> tuple[list[int], dict[str, int]]:
    """Queue ``items`` (none: nothing) and wake this process's senders: the row ids queued,
    and the destinations of those held back with the later job holding each."""
    if not items:
        return [], {}
    from node.runtime.delivery import enqueue_deliveries  # also wakes this process's senders

    with session_factory() as session:
        ids = enqueue_deliveries(session, job_id=job_id, items=items)
        rows = session.execute(
            select(Delivery.id, Delivery.destination).where(
                Delivery.id.in_(ids), Delivery.state == DeliveryState.cancelled
            )
        )
        held = {row_id: destination for row_id, destination in rows}
        by = order_replacing(session, job_id, held.values()) if held else {}
    return [i for i in ids if i not in held], {d: by[d] for d in held.values() if d in by}


def _write_kos(
    outputs_dir: Path,
    headers: Sequence[Dataset],
    reason: str,
    text: DraftText | None,
    now: dt.datetime,
) -> tuple[Path, str]:
    """The IOCM rejection note of ``headers`` (one study), written to ``outputs_dir``."""
    study_uid = str(headers[0].StudyInstanceUID)
    model = text.model_name if text is not None else MANUFACTURER
    version = text.model_version if text is not None else node_version
    withdrawn = [str(h.SOPInstanceUID) for h in headers]
    ids = draft_ids("kos", study_uid, model, version, inputs=withdrawn, text=reason)
    note = build_rejection_note(
        headers,
        **ids,
        manufacturer=MANUFACTURER,
        reason=reason,
        demo=text.demo if text is not None else False,
        created_at=now,
    )
    uid = ids["sop_instance_uid"]
    return write_output(note, outputs_dir, f"{uid}.dcm"), uid
