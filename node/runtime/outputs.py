"""The draft's outbound objects: one file per object, written before it is queued.

After the worker writes the Comprehensive SR, :func:`build_outputs` makes what each
configured destination gets (:mod:`integration.destinations`) and returns one
:class:`~node.db.deliveries.Outbound` per (destination, object):

- DICOM destinations (DIMSE C-STORE or STOW-RS), per their ``objects``: ``sr`` the
  Comprehensive SR (TID 2000), ``basic-sr`` a Basic Text SR of the same text, ``pdf`` the AI
  DRAFT Encapsulated PDF (PS3.3 A.45.1) in its own series of the same study, ``coded-sr``
  the rule labeler's 14 CheXpert observations of the draft coded with presence (TID 1500,
  :mod:`integration.coded_findings`; left out when the draft mentions none);
- HL7 destinations: an ORU^R01 (v2.5.1, OBR-25/OBX-11 ``R``: results stored, not yet
  verified) per destination (its MSH-5/6 and MSH-10 differ), ``report``;
- FHIR destinations: one transaction Bundle (Device, DiagnosticReport ``partial``, R4's
  status for a report that may be unverified, with the PDF as ``presentedForm`` and, for a
  redraft, the earlier draft's report as the one it replaces, Provenance), ``report``.

A sent draft is withdrawn by :func:`node.runtime.withdrawal.withdraw`.

Every file is written under ``<spool>/outputs`` durably and privately
(:func:`node.runtime.output_files.write_output`): it carries patient data. Object UIDs are
derived from the content (:func:`node.runtime.draft_objects.draft_ids`), so a re-run with the
same text rebuilds the same objects. Logs name jobs, objects and UIDs, never text or patient
data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from integration.coded_findings import build_coded_findings_sr
from integration.destinations import (
    DicomDestination,
    FhirDestination,
    Hl7Destination,
    StowDestination,
)
from integration.encapsulated_pdf import build_encapsulated_pdf
from integration.fhir_report import build_draft_bundle
from integration.hl7_oru import build_draft_oru, message_control_id
from integration.report_pdf import DraftReportContent, render_report_pdf, report_header_from
from node import __version__ as node_version
from node.db.deliveries import Outbound
from node.db.models import DeliveryObject
from node.runtime.draft_objects import (
    DraftIds,
    DraftText,
    draft_sr,
    fhir_draft,
    hl7_parties,
    hl7_result,
)
from node.runtime.output_files import short_digest, spool_relative, write_output
from node.settings import Settings

__all__ = ["build_outputs"]

#: (the object, its file, its UID) for one destination
_Made = tuple[DeliveryObject, Path, str]


def _pdf_bytes(image_read: Dataset, text: DraftText) -> bytes:
    """The draft report PDF (:func:`integration.report_pdf.render_report_pdf`)."""
    return render_report_pdf(
        DraftReportContent(
            header=report_header_from(image_read),
            **text.fields(),
            generated_at=text.created_at,
            software_version=node_version,
        )
    )


@dataclass(frozen=True)
class _Draft:
    """What the outputs are built from: the SR as written, the image read, the evidence."""

    sr: Dataset
    sr_path: Path
    image_read: Dataset
    evidence: list[Dataset]
    text: DraftText
    reissue: int
    replaces: str | None

    @property
    def sr_uid(self) -> str:
        return str(self.sr.SOPInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.image_read.StudyInstanceUID)


class _Builder:
    """Builds and writes each object once, however many destinations get it."""

    def __init__(
        self,
        settings: Settings,
        outputs_dir: Path,
        draft: _Draft,
        before_rename: Callable[[], None] | None,
    ) -> None:
        self.settings = settings
        self.outputs_dir = outputs_dir
        self.draft = draft
        self.before_rename = before_rename
        self._files: dict[str, tuple[Path, str]] = {}
        self._pdf: bytes | None = None

    def once(
        self, key: str, make: Callable[[], tuple[bytes | Dataset, str, str]]
    ) -> tuple[Path, str]:
        """(file, UID) of object ``key``; ``make()`` gives (data, file name, UID) the first time."""
        if key not in self._files:
            data, name, uid = make()
            path = write_output(data, self.outputs_dir, name, before_rename=self.before_rename)
            self._files[key] = (path, uid)
        return self._files[key]

    def pdf(self) -> bytes:
        """The draft report PDF, rendered once."""
        if self._pdf is None:
            self._pdf = _pdf_bytes(self.draft.image_read, self.draft.text)
        return self._pdf

    def coded(self) -> tuple[Path, str] | None:
        """The coded findings SR (TID 1500) and its UID; ``None`` when nothing is mentioned."""
        d = self.draft
        labels = d.text.labels
        if all(v == "not_mentioned" for v in labels.values()):
            return None

        def make() -> tuple[Dataset, str, str]:
            t = d.text
            author = t.dicom_author()
            ds = build_coded_findings_sr(
                d.image_read,
                labels,
                model_name=t.model_name,
                model_version=t.model_version,
                demo=t.demo,
                draft_sr_uid=d.sr_uid,
                content_datetime=t.created_at,
                manufacturer=author["manufacturer"],
                software_version=author["software_version"],
            )
            uid = str(ds.SOPInstanceUID)
            return ds, f"{uid}.dcm", uid

        return self.once("coded-sr", make)

    def dicom(self, obj: str) -> tuple[Path, str] | None:
        """A DICOM object of :data:`_DICOM_OBJECTS` (or the SR as written, or the coded
        findings SR) and its UID."""
        d = self.draft
        if obj == "sr":
            return d.sr_path, d.sr_uid
        if obj == "coded-sr":
            return self.coded()
        kind, build = _DICOM_OBJECTS[obj]

        def make() -> tuple[Dataset, str, str]:
            t = d.text
            inputs = [str(ds.SOPInstanceUID) for ds in d.evidence]
            ids = t.ids(kind, d.study_uid, inputs=inputs, reissue=d.reissue)
            uid = ids["sop_instance_uid"]
            return build(self, ids), f"{uid}.dcm", uid

        return self.once(obj, make)

    def hl7(self, dest: Hl7Destination) -> tuple[Path, str]:
        """The ORU^R01 for ``dest`` (its own MSH-5/6 and MSH-10) and its MSH-10."""

        def make() -> tuple[bytes, str, str]:
            control_id = message_control_id(self.draft.sr_uid, "draft", str(dest))
            message = build_draft_oru(
                self.draft.image_read,
                hl7_result(self.draft.text),
                hl7_parties(self.settings, dest),
                control_id=control_id,
            )
            name = f"{self.draft.sr_uid}.{short_digest(str(dest))}.hl7"
            return message.encode("utf-8"), name, control_id

        return self.once(f"hl7:{dest}", make)

    def fhir(self) -> tuple[Path, str]:
        """The FHIR transaction Bundle (identifier: the SR's SOP Instance UID)."""

        def make() -> tuple[bytes, str, str]:
            d = self.draft
            draft = fhir_draft(d.text, d.sr_uid, self.pdf(), d.text.created_at, replaces=d.replaces)
            bundle = build_draft_bundle(d.image_read, draft)
            data = json.dumps(bundle, ensure_ascii=False).encode("utf-8")
            return data, f"{d.sr_uid}.fhir.json", d.sr_uid

        return self.once("fhir", make)

    def made_for(
        self, dest: DicomDestination | StowDestination | Hl7Destination | FhirDestination
    ) -> list[_Made]:
        """The objects ``dest`` gets: its DICOM ``objects``, or one ``report``."""
        if isinstance(dest, DicomDestination | StowDestination):
            made = [(obj, self.dicom(obj)) for obj in dest.objects]
            return [(DeliveryObject(obj), *m) for obj, m in made if m is not None]
        if isinstance(dest, Hl7Destination):
            return [(DeliveryObject.report, *self.hl7(dest))]
        return [(DeliveryObject.report, *self.fhir())]


def _basic_sr(builder: _Builder, ids: DraftIds) -> Dataset:
    """The Basic Text SR (PS3.3 A.35.1) of the draft, dated when the draft was made."""
    d = builder.draft
    return draft_sr(
        d.text,
        ids,
        evidence=d.evidence,
        image_read=d.image_read,
        kind="basic",
        created_at=d.text.created_at,
    )


def _encapsulated_pdf(builder: _Builder, ids: DraftIds) -> Dataset:
    """The draft report PDF as an Encapsulated PDF (PS3.3 A.45.1) of the study."""
    t = builder.draft.text
    return build_encapsulated_pdf(
        builder.pdf(),
        source=builder.draft.image_read,
        **ids,
        created_at=t.created_at,
        **t.dicom_author(),
    )


#: DICOM objects built from the draft, by ``objects`` value: the kind of
#: :data:`integration.uids.DRAFT_KINDS` their UIDs derive from, and their builder
_DICOM_OBJECTS: dict[str, tuple[str, Callable[[_Builder, DraftIds], Dataset]]] = {
    "basic-sr": ("sr-basic", _basic_sr),
    "pdf": ("pdf", _encapsulated_pdf),
}


def build_outputs(
    settings: Settings,
    outputs_dir: Path,
    *,
    sr: Dataset,
    sr_path: Path,
    image_read: Dataset,
    evidence: Sequence[Dataset],
    text: DraftText,
    reissue: int = 0,
    replaces: str | None = None,
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
    reissue
        Which issue of the draft its objects' UIDs are
        (:func:`~node.runtime.draft_objects.draft_reissue`; the SR's).
    replaces
        The SR UID of the study's earlier draft this one supersedes: its FHIR report is
        named as the one the new report replaces (``diagnosticReport-replaces``).
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
    draft = _Draft(sr, sr_path, image_read, list(evidence) or [image_read], text, reissue, replaces)
    builder = _Builder(settings, outputs_dir, draft, before_rename)
    return [
        Outbound(dest, obj, spool_relative(path), uid)
        for dest in settings.destinations
        for obj, path, uid in builder.made_for(dest)
    ]
