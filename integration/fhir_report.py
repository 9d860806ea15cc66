"""The AI draft report as a FHIR R4 transaction Bundle (fhir.resources).

What is built (a ``transaction`` Bundle, so that one request stores it all or nothing):

- **Device** (``PUT Device?identifier=urn:dicom:uid|urn:oid:<device UID>``): the AI, with
  deviceName (model-name), version, manufacturer and, for the DEMO model, a note;
- **DiagnosticReport** (``PUT DiagnosticReport?identifier=urn:dicom:uid|urn:oid:<SR UID>``,
  a conditional update, so a re-send replaces instead of duplicating): see below;
- **Provenance** (``POST Provenance``): target = the report, agent.who = the Device in the
  role "author", activity CREATE.

DiagnosticReport: ``status`` :data:`DRAFT_STATUS`, category ``v2-0074#RAD``, code LOINC
18748-4, ``subject`` a logical reference by the patient identifier, ``effectiveDateTime``
from Study Date/Time, ``issued``, ``identifier`` ``urn:dicom:uid`` / ``urn:oid:<SR SOP
Instance UID>`` (the draft's DICOM SR), ``basedOn`` a logical ServiceRequest reference by
accession number (identifier type ``v2-0203#ACSN``), ``imagingStudy`` a logical reference
by Study Instance UID (``urn:dicom:uid`` / ``urn:oid:<Study UID>``, as IHE IDR does),
``conclusion`` = impression, ``presentedForm`` = the PDF, a narrative with the warning,
findings and impression, for a draft that supersedes an earlier one of the study the core
extension ``diagnosticReport-replaces`` naming that one's report by its identifier, and
``meta.security`` ``v3-ObservationValue#AIAST`` "Artificial
Intelligence asserted" (the label HL7's AI Transparency on FHIR IG, a ballot, uses).

Choices where the request and the standard differ:

- **Status ``partial``, not ``preliminary``.** R4 defines ``preliminary`` as "Verified early
  results are available, but not all results are final" and ``partial`` as "This is a
  partial (e.g. initial, interim or preliminary) report: data in the report may be
  incomplete and/or unverified". An AI draft nobody has reviewed is the latter.
- **The AI as a Device, linked by Provenance.** ``performer`` and ``resultsInterpreter``
  allow only Practitioner, PractitionerRole, Organization and CareTeam, so the Device
  cannot go there; Provenance.agent.who allows Device and is what FHIR defines for "who
  authored this". A contained Device reached through an extension would need a custom
  extension no receiver knows; the Bundle uses only core elements.

Related modules: the withdrawal (``entered-in-error``) is built by
:func:`integration.fhir_withdrawal.build_withdrawal_bundle` from the DiagnosticReport parts
here (:func:`report_resource`, :func:`report_entry`, :func:`narrative`); codings and
identifiers are in :mod:`integration.fhir_coding`; every Bundle is validated by
:func:`integration.fhir_check.check_bundle`; :mod:`integration.fhir_send` sends it.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from integration.errors import FhirBuildError
from integration.fhir_check import check_bundle
from integration.fhir_coding import (
    AI_ASSERTED,
    DATA_OPERATION,
    LOINC,
    PARTICIPANT_TYPE,
    REPORT_CODE,
    V2_0074,
    accession_identifier,
    bundle_entry,
    coding,
    conditional_url,
    dicom_uid_identifier,
    effective_datetime,
    entry_urn,
    is_dicom_uid,
    patient_identifier,
)
from integration.header_values import header_text
from integration.uids import device_uid as default_device_uid

__all__ = [
    "DEMO_WARNING",
    "DRAFT_STATUS",
    "DRAFT_WARNING",
    "REPLACES_EXTENSION",
    "FhirDraft",
    "ReportContext",
    "build_draft_bundle",
    "check_draft",
    "narrative",
    "report_entry",
    "report_resource",
    "transaction_bundle",
    "xhtml_text",
]

_NOT_XML_CHAR = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""A character XML 1.0 does not allow (section 2.2, production [2] Char)."""
DRAFT_STATUS = "partial"
"""DiagnosticReport.status of an unverified AI draft (see the module text)."""
DRAFT_WARNING = "AI-generated DRAFT, not verified by a radiologist. Not for diagnosis."
DEMO_WARNING = (
    "DEMO MODEL: randomly initialised weights. This text is meaningless and must not be "
    "used for any clinical purpose."
)
REPLACES_EXTENSION = "http://hl7.org/fhir/StructureDefinition/diagnosticReport-replaces"
"""The core R4 extension (0..1 Reference(DiagnosticReport)): "The report replaces the target
resource", as a later report replaces a preliminary one."""


@dataclass(frozen=True, slots=True)
class FhirDraft:
    """The draft as the FHIR resources carry it.

    Parameters
    ----------
    sr_sop_instance_uid
        SOP Instance UID of the draft SR: the report's business identifier.
    impression
        DiagnosticReport.conclusion (must not be empty).
    findings
        Findings (narrative only; R4 has no findings element), or ``None``.
    model_name, model_version
        Device.deviceName / Device.version.
    demo
        DEMO model: Device.note and the narrative say so.
    issued
        DiagnosticReport.issued and Provenance.recorded (timezone-aware).
    pdf
        The draft report PDF for presentedForm, or ``None``.
    manufacturer
        Device.manufacturer.
    device_uid
        Device identifier (``urn:oid:``); default :func:`integration.uids.device_uid`.
    replaces_sr_uid
        SOP Instance UID of the SR of the study's draft this one supersedes, whose
        DiagnosticReport it replaces (:data:`REPLACES_EXTENSION`), or ``None``.
    """

    sr_sop_instance_uid: str
    impression: str
    findings: str | None
    model_name: str
    model_version: str
    demo: bool
    issued: dt.datetime
    pdf: bytes | None = field(default=None, repr=False)
    manufacturer: str = "llm-cxr-node"
    device_uid: str | None = None
    replaces_sr_uid: str | None = None


@dataclass(frozen=True, slots=True)
class ReportContext:
    """Where the DiagnosticReport's identifiers and time come from, besides the image.

    Parameters
    ----------
    patient_id_system
        Identifier.system of the patient ID (the site's MRN system URI); default from the
        Issuer of Patient ID Qualifiers Sequence (``urn:oid:``) or none.
    accession_system
        Identifier.system of the accession number; default from the Issuer of Accession
        Number Sequence (``urn:oid:``) or none.
    local_timezone
        Time zone of Study Date/Time when the image has no Timezone Offset From UTC
        (0008,0201); ``None`` then gives a date-only effectiveDateTime (FHIR requires a
        zone when a time is given).
    """

    patient_id_system: str | None = None
    accession_system: str | None = None
    local_timezone: dt.tzinfo | None = None


_NO_CONTEXT = ReportContext()


def _replaces(sr_uid: str) -> dict[str, Any]:
    """The :data:`REPLACES_EXTENSION` naming the draft report of SR ``sr_uid`` by its
    identifier (a logical reference: the server holds it under that identifier)."""
    return {
        "url": REPLACES_EXTENSION,
        "valueReference": {"type": "DiagnosticReport", "identifier": dicom_uid_identifier(sr_uid)},
    }


def build_draft_bundle(
    source: Dataset,
    draft: FhirDraft,
    *,
    context: ReportContext = _NO_CONTEXT,
) -> dict[str, Any]:
    """Build the transaction Bundle (Device + DiagnosticReport + Provenance) of a draft.

    Parameters
    ----------
    source
        The image the model read (header is enough).
    draft
        Text, identifiers and author.
    context
        The identifier systems and local time zone (:class:`ReportContext`); by default
        all from the image.

    Returns
    -------
    dict
        The Bundle as JSON-ready data, validated by
        :func:`integration.fhir_check.check_bundle`.

    Raises
    ------
    integration.errors.FhirBuildError
        Empty impression or patient ID, a naive ``issued``, invalid UIDs, or a Bundle that
        does not validate.
    """
    device_uid = check_draft(source, draft)
    issued = draft.issued.isoformat(timespec="seconds")
    device_url = entry_urn("device", device_uid)
    device = _device(draft, device_uid)
    report = report_resource(
        source, draft, DRAFT_STATUS, narrative(draft, _sections(draft)), context
    )
    report["conclusion"] = draft.impression.strip()
    if draft.pdf is not None:
        report["presentedForm"] = [_presented_form(draft.pdf, issued)]
    if draft.replaces_sr_uid is not None:
        report["extension"] = [_replaces(draft.replaces_sr_uid)]
    entry = report_entry(report, draft)
    provenance = _provenance(entry["fullUrl"], device_url, issued)
    provenance_url = entry_urn("provenance", draft.sr_sop_instance_uid, issued)
    return transaction_bundle(
        [
            bundle_entry(device_url, device, "PUT", conditional_url("Device", device_uid)),
            entry,
            bundle_entry(provenance_url, provenance, "POST", "Provenance"),
        ]
    )


def check_draft(source: Dataset, draft: FhirDraft) -> str:
    """Check what every report Bundle needs; return the UID that identifies the Device.

    Parameters
    ----------
    source
        The image the model read.
    draft
        The draft.

    Returns
    -------
    str
        ``draft.device_uid``, or :func:`integration.uids.device_uid` of the model.

    Raises
    ------
    integration.errors.FhirBuildError
        In this order: an empty impression, a naive ``issued`` (an R4 instant has a zone),
        an SR SOP Instance UID (or the replaced one) that is not a UID, a source without
        Study Instance UID.
    ValueError
        No ``device_uid`` and an empty model name or version.
    """
    if not draft.impression.strip():
        raise FhirBuildError("impression text is empty")
    if draft.issued.tzinfo is None or draft.issued.utcoffset() is None:
        raise FhirBuildError("issued must be timezone-aware (FHIR instant)")
    if not is_dicom_uid(draft.sr_sop_instance_uid):
        raise FhirBuildError("sr_sop_instance_uid is not a DICOM UID")
    if draft.replaces_sr_uid is not None and not is_dicom_uid(draft.replaces_sr_uid):
        raise FhirBuildError("replaces_sr_uid is not a DICOM UID")
    if not header_text(source, "StudyInstanceUID"):
        raise FhirBuildError("source has no Study Instance UID")
    return draft.device_uid or default_device_uid(draft.model_name, draft.model_version)


def report_resource(
    source: Dataset, draft: FhirDraft, status: str, div: str, context: ReportContext
) -> dict[str, Any]:
    """The DiagnosticReport (FHIR R4) common to the draft and its withdrawal.

    Parameters
    ----------
    source
        The image the model read, checked by :func:`check_draft`: subject, imagingStudy
        (Study Instance UID), effectiveDateTime, basedOn.
    draft
        Identifier (SR SOP Instance UID) and ``issued``.
    status
        DiagnosticReport.status (:data:`DRAFT_STATUS` or ``entered-in-error``).
    div
        The XHTML narrative (:func:`narrative`).
    context
        Identifier systems and local time zone.

    Returns
    -------
    dict
        meta.security AIAST, text, identifier, status, category RAD, code LOINC 18748-4,
        subject, issued, imagingStudy, and effectiveDateTime and basedOn when known; no
        conclusion or presentedForm (the caller adds what it needs).

    Raises
    ------
    integration.errors.FhirBuildError
        Patient ID (0010,0020) is empty.
    """
    study_uid = header_text(source, "StudyInstanceUID")
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": {"security": [dict(AI_ASSERTED)]},
        "text": {"status": "generated", "div": div},
        "identifier": [dicom_uid_identifier(draft.sr_sop_instance_uid)],
        "status": status,
        "category": [{"coding": [coding(V2_0074, "RAD", "Radiology")]}],
        "code": {
            "coding": [coding(LOINC, *REPORT_CODE)],
            "text": "AI-generated draft radiology report (not verified)",
        },
        "subject": {
            "type": "Patient",
            "identifier": patient_identifier(source, context.patient_id_system),
        },
        "issued": draft.issued.isoformat(timespec="seconds"),
        "imagingStudy": [{"type": "ImagingStudy", "identifier": dicom_uid_identifier(study_uid)}],
    }
    effective = effective_datetime(source, context.local_timezone)
    if effective:
        report["effectiveDateTime"] = effective
    accession = accession_identifier(source, context.accession_system)
    if accession is not None:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": accession}]
    return report


def report_entry(report: dict[str, Any], draft: FhirDraft) -> dict[str, Any]:
    """The Bundle entry of the report: a conditional ``PUT`` on its SR UID identifier.

    Its fullUrl is derived from the SR SOP Instance UID, so the draft's Provenance and a
    later withdrawal name the same report.
    """
    uid = draft.sr_sop_instance_uid
    return bundle_entry(
        entry_urn("report", uid), report, "PUT", conditional_url("DiagnosticReport", uid)
    )


def transaction_bundle(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A ``transaction`` Bundle of ``entries``, validated by :func:`check_bundle`.

    Raises
    ------
    integration.errors.FhirBuildError
        The Bundle does not validate.
    """
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction"}
    bundle["entry"] = list(entries)
    check_bundle(bundle)
    return bundle


def narrative(draft: FhirDraft, tail: Sequence[str] = (), *, lead: Sequence[str] = ()) -> str:
    """The report's XHTML narrative (FHIR R4 Narrative.div, escaped text only).

    Parameters
    ----------
    draft
        Model name and version; DEMO flag.
    lead, tail
        XHTML fragments before and after the common part: :data:`DRAFT_WARNING`, the model,
        and :data:`DEMO_WARNING` for the DEMO model.

    Returns
    -------
    str
        A ``<div xmlns="http://www.w3.org/1999/xhtml">`` element.
    """
    parts = [
        *lead,
        _bold(DRAFT_WARNING),
        _paragraph(f"Model: {draft.model_name} {draft.model_version}"),
    ]
    if draft.demo:
        parts.append(_bold(DEMO_WARNING))
    parts.extend(tail)
    return '<div xmlns="http://www.w3.org/1999/xhtml">' + "".join(parts) + "</div>"


def xhtml_text(text: str) -> str:
    """``text`` as XHTML character data: escaped, without what XML 1.0 cannot hold.

    R4 Narrative.div "SHALL" be XHTML (Narrative, txt-1), an XML 1.0 element, whose
    characters are TAB, LF, CR, U+0020-U+D7FF, U+E000-U+FFFD and U+10000-U+10FFFF (XML 1.0
    section 2.2, production [2]). Any other character (a control character a model wrote,
    e.g. BEL or ESC) becomes U+FFFD REPLACEMENT CHARACTER, so a server can parse the
    narrative; the JSON strings (e.g. ``conclusion``) keep the exact text.
    """
    return _NOT_XML_CHAR.sub("\ufffd", html.escape(text, quote=False))


def _paragraph(text: str) -> str:
    """``<p>`` of XHTML text (:func:`xhtml_text`), line breaks as ``<br/>``."""
    return "<p>" + xhtml_text(text).replace("\n", "<br/>") + "</p>"


def _bold(text: str) -> str:
    """``<p><b>`` of XHTML text (:func:`xhtml_text`)."""
    return f"<p><b>{xhtml_text(text)}</b></p>"


def _sections(draft: FhirDraft) -> list[str]:
    """The Findings (when not empty) and Impression sections of the draft's narrative."""
    sections = []
    if draft.findings and draft.findings.strip():
        sections.append("<h3>Findings</h3>" + _paragraph(draft.findings.strip()))
    sections.append("<h3>Impression</h3>" + _paragraph(draft.impression.strip()))
    return sections


def _device(draft: FhirDraft, device_uid: str) -> dict[str, Any]:
    """The AI as an R4 Device: identifier, deviceName (model-name), version, manufacturer."""
    device: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [dicom_uid_identifier(device_uid)],
        "status": "active",
        "manufacturer": draft.manufacturer,
        "deviceName": [{"name": draft.model_name, "type": "model-name"}],
        "type": {"text": "AI algorithm: chest X-ray report drafting"},
        "version": [{"value": draft.model_version}],
    }
    if draft.demo:
        device["note"] = [{"text": DEMO_WARNING}]
    return device


def _presented_form(pdf: bytes, issued: str) -> dict[str, Any]:
    """DiagnosticReport.presentedForm (R4 Attachment): the PDF, base64, titled as a draft."""
    return {
        "contentType": "application/pdf",
        "language": "en",
        "data": base64.b64encode(pdf).decode("ascii"),
        "title": "AI-generated DRAFT report (not verified)",
        "creation": issued,
    }


def _provenance(report_url: str, device_url: str, issued: str) -> dict[str, Any]:
    """R4 Provenance: the Device authored (activity CREATE) the report at ``issued``."""
    return {
        "resourceType": "Provenance",
        "target": [{"reference": report_url, "type": "DiagnosticReport"}],
        "recorded": issued,
        "activity": {"coding": [coding(DATA_OPERATION, "CREATE", "create")]},
        "agent": [
            {
                "type": {"coding": [coding(PARTICIPANT_TYPE, "author", "Author")]},
                "who": {"reference": device_url, "type": "Device"},
            }
        ],
    }
