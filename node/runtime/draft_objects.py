"""The draft as every outbound object carries it: its text, its UIDs and its author.

One :class:`DraftText` (from the model's draft or from the stored ``drafts`` row) feeds
every object the node sends about a draft:

- DICOM: the Comprehensive SR (TID 2000) and the Basic Text SR (PS3.3 A.35.1) through
  :func:`draft_sr`, with UIDs and Series Number from :func:`draft_ids`
  (:mod:`integration.uids`: derived from the study, the model, the evidence and the text, so
  a re-run with the same text rebuilds the same objects; :func:`draft_reissue` gives the same
  draft made again after its withdrawal new ones);
- HL7 v2.5.1 ORU^R01: :func:`hl7_result` and :func:`hl7_parties` (MSH-3 to MSH-6);
- FHIR R4 DiagnosticReport: :func:`fhir_draft`.

The node is the objects' manufacturer (:data:`MANUFACTURER`, :data:`SOFTWARE`: Manufacturer
(0008,0070) and Software Versions (0018,1020), OBX-18, Device).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, TypedDict

from pydicom.dataset import Dataset

from integration.destinations import Hl7Destination
from integration.draft_header import requested_procedures_from
from integration.fhir_report import FhirDraft
from integration.hl7_oru import DraftResult, Hl7Parties
from integration.sr import build_draft_sr
from integration.uids import draft_instance_uid, draft_series_number, draft_series_uid
from node import __version__ as node_version
from node.settings import Settings

__all__ = [
    "MANUFACTURER",
    "NO_TEXT",
    "SOFTWARE",
    "DicomAuthor",
    "DraftFields",
    "DraftIds",
    "DraftText",
    "draft_ids",
    "draft_reissue",
    "draft_sr",
    "fhir_draft",
    "hl7_parties",
    "hl7_result",
    "impression_text",
]

MANUFACTURER = "llm-cxr-node"
SOFTWARE = f"llm-cxr-node {node_version}"
#: what the outputs say where the model wrote nothing (an SR's impression must not be empty)
NO_TEXT = "(no text generated)"


def impression_text(impression: str | None, text: str | None) -> str:
    """The impression every output carries: the draft's impression, else its whole text,
    else :data:`NO_TEXT`, without surrounding spaces. The draft's objects and a withdrawal
    built later from the stored row say the same (HL7 OBX lines sent again marked ``W``)."""
    return (impression or "").strip() or (text or "").strip() or NO_TEXT


class DraftFields(TypedDict):
    """The draft's text and model under the names the report builders share
    (:class:`integration.hl7_oru.DraftResult`, :class:`integration.fhir_report.FhirDraft`,
    :class:`integration.report_pdf.DraftReportContent`)."""

    impression: str
    findings: str | None
    model_name: str
    model_version: str
    demo: bool


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

    def ids(
        self, kind: str, study_uid: str, *, inputs: Sequence[str], reissue: int = 0
    ) -> DraftIds:
        """The UIDs and Series Number of this draft's object of ``kind`` in ``study_uid``,
        made from ``inputs`` (:func:`draft_ids` of its model and :attr:`as_sent`)."""
        return draft_ids(
            kind,
            study_uid,
            self.model_name,
            self.model_version,
            inputs=inputs,
            text=self.as_sent,
            reissue=reissue,
        )

    def fields(self) -> DraftFields:
        """Impression, findings, model name and version, DEMO flag (keyword arguments)."""
        return DraftFields(
            impression=self.impression,
            findings=self.findings,
            model_name=self.model_name,
            model_version=self.model_version,
            demo=self.demo,
        )

    @cached_property
    def labels(self) -> dict[str, str]:
        """The 14 CheXpert labels of the draft's text (``models.labeler``'s rule labeler;
        ``{observation: label}`` as :mod:`integration.coded_findings` takes them)."""
        from models.labeler import default_labeler

        text = f"{self.findings or ''}\n{self.impression}"
        return {o.value: lab.value for o, lab in default_labeler().label(text).items()}

    def dicom_author(self) -> DicomAuthor:
        """The algorithm and this node as a DICOM draft object names them (keyword arguments)."""
        return DicomAuthor(
            algorithm_name=self.model_name,
            algorithm_version=self.model_version,
            demo=self.demo,
            manufacturer=MANUFACTURER,
            software_version=SOFTWARE,
        )


class DicomAuthor(TypedDict):
    """Who made a DICOM draft object, as :func:`integration.sr.build_draft_sr` and
    :func:`integration.encapsulated_pdf.build_encapsulated_pdf` take it: the algorithm
    (Contributing Equipment, TID 4019 Algorithm Identification), the DEMO flag, and the node
    as Manufacturer (0008,0070) and Software Versions (0018,1020)."""

    algorithm_name: str
    algorithm_version: str
    demo: bool
    manufacturer: str
    software_version: str


class DraftIds(TypedDict):
    """The identity of one draft object in its study (PS3.3 C.12.1, C.7.3.1), as keyword
    arguments of the object builders.

    Parameters
    ----------
    sop_instance_uid
        SOP Instance UID (0008,0018).
    series_instance_uid
        Series Instance UID (0020,000E): one series per kind, model and version.
    series_number
        Series Number (0020,0011).
    """

    sop_instance_uid: str
    series_instance_uid: str
    series_number: int


def draft_ids(
    kind: str,
    study_uid: str,
    model_name: str,
    model_version: str,
    *,
    inputs: Sequence[str],
    text: str,
    reissue: int = 0,
) -> DraftIds:
    """UIDs and Series Number of a draft object (:mod:`integration.uids`).

    Parameters
    ----------
    kind
        A key of :data:`integration.uids.DRAFT_KINDS`: ``sr``, ``sr-basic``, ``pdf``, ``kos``.
    study_uid, model_name, model_version
        The study and the model that drafted it.
    inputs
        SOP Instance UIDs of the instances the object is made from.
    text
        What the object says (:attr:`DraftText.as_sent`, or a withdrawal's reason).
    reissue
        Which issue of the same draft (:func:`draft_reissue`; 0: the first).
    """
    return DraftIds(
        sop_instance_uid=draft_instance_uid(
            kind, study_uid, model_name, model_version, inputs=inputs, text=text, reissue=reissue
        ),
        series_instance_uid=draft_series_uid(kind, study_uid, model_name, model_version),
        series_number=draft_series_number(kind, model_name, model_version),
    )


def draft_reissue(
    study_uid: str, text: DraftText, *, inputs: Sequence[str], withdrawn: Collection[str]
) -> int:
    """The issue of a draft whose objects get new UIDs: the first whose SR UID was not withdrawn.

    A draft made again with the same text from the same instances gets the same UIDs, so a
    re-run or a duplicate stays one object. Once that SR was withdrawn, its UID is never
    issued again: the IOCM rejection note keeps the instance hidden in the PACS, an HL7
    receiver has seen the MSH-10 derived from it, and a FHIR conditional update on it would
    turn the ``entered-in-error`` report back into a draft. :mod:`integration.uids`.

    Parameters
    ----------
    study_uid
        The study.
    text
        The draft (its model and :attr:`DraftText.as_sent`).
    inputs
        SOP Instance UIDs of the instances it was made from.
    withdrawn
        SOP Instance UIDs of the study's withdrawn draft SRs.

    Returns
    -------
    int
        0 unless issue 0's SR UID is in ``withdrawn``; else the first issue whose UID is not.
    """
    reissue = 0
    while (
        text.ids("sr", study_uid, inputs=inputs, reissue=reissue)["sop_instance_uid"] in withdrawn
    ):
        reissue += 1
    return reissue


def draft_sr(
    text: DraftText,
    ids: DraftIds,
    *,
    evidence: Sequence[Dataset],
    image_read: Dataset,
    kind: Literal["comprehensive", "basic"] = "comprehensive",
    created_at: dt.datetime | None = None,
    instance_number: int = 1,
    previous_versions: Sequence[Dataset] | None = None,
) -> Dataset:
    """The draft as an SR (:func:`integration.sr.build_draft_sr`) made by this node; the
    labeler's positive observations are coded in its Findings (TID 2002 CODE items).

    ``kind``: Comprehensive SR (TID 2000) or Basic Text SR (PS3.3 A.35.1). The Requested
    Procedures come from ``image_read``
    (:func:`integration.draft_header.requested_procedures_from`);
    ``created_at`` ``None`` dates the SR now; ``previous_versions`` fills the Predecessor
    Documents Sequence (PS3.3 C.17.2).

    Raises
    ------
    integration.errors.IntegrationError
        The SR cannot be built from this draft.
    """
    return build_draft_sr(
        evidence=evidence,
        image_read=image_read,
        findings=text.findings,
        impression=text.impression,
        **text.dicom_author(),
        **ids,
        instance_number=instance_number,
        kind=kind,
        created_at=created_at,
        previous_versions=previous_versions,
        requested_procedures=requested_procedures_from(image_read) or None,
        coded_findings=text.labels,
    )


def hl7_parties(settings: Settings, dest: Hl7Destination) -> Hl7Parties:
    """MSH-3 to MSH-6 (HL7 v2.5.1 §2.14.9): the node's application and facility to ``dest``'s."""
    return Hl7Parties(
        sending_application=settings.hl7_sending_application,
        sending_facility=settings.hl7_sending_facility,
        receiving_application=dest.receiving_application,
        receiving_facility=dest.receiving_facility,
    )


def hl7_result(text: DraftText) -> DraftResult:
    """The draft as an ORU^R01 carries it (OBX text, OBX-18 model, OBR-22 report time)."""
    return DraftResult(**text.fields(), report_time=text.created_at, manufacturer=MANUFACTURER)


def fhir_draft(
    text: DraftText,
    sr_uid: str,
    pdf: bytes | None,
    issued: dt.datetime,
    *,
    replaces: str | None = None,
) -> FhirDraft:
    """The draft as the FHIR R4 resources carry it (identifier: the SR's SOP Instance UID;
    DiagnosticReport.issued ``issued``; ``pdf`` as ``presentedForm``, ``None`` for none;
    ``replaces`` the SR UID of the earlier draft whose report it replaces, or ``None``)."""
    return FhirDraft(
        sr_sop_instance_uid=sr_uid,
        **text.fields(),
        issued=issued,
        pdf=pdf,
        manufacturer=MANUFACTURER,
        replaces_sr_uid=replaces,
    )
