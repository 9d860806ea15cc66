"""The AI draft report as FHIR R4 resources (fhir.resources), and a small FHIR REST sender.

Models: ``fhir.resources`` 8 has no R4 package any more; its ``R4B`` models (FHIR 4.3.0) are
used. R4B's changes are "limited to particular areas of the specification" (R4B version
history: medicinal product definition, evidence and subscription resources, two new data
types); DiagnosticReport, Device, Provenance and Bundle keep the R4 elements used here, so
the JSON produced is R4 JSON and an R4 server accepts it.

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
findings and impression, and ``meta.security`` ``v3-ObservationValue#AIAST`` "Artificial
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
- **Withdrawal** (:func:`build_withdrawal_bundle`): a transaction with only the same
  conditional ``PUT`` of the report, ``status`` ``entered-in-error``, same identifier, the
  reason in the narrative, without conclusion and PDF (the server's version history keeps
  the draft and its Provenance).
- **Value sets and reference types fhir.resources does not enforce** (it accepts any
  status code and a Device performer) are checked by :func:`check_bundle`: report status
  (R4's 10 codes), Bundle type and request methods, Device name types, and the target
  types of subject, basedOn, imagingStudy, performer, resultsInterpreter and
  Provenance.agent.who.

Sender (:func:`send_transaction`, :func:`update_conditional`, httpx): bearer token, JSON
``application/fhir+json``, timeouts; 2xx = delivered; 408, 429, 5xx, timeouts and
connection errors are transient; every other status (4xx, and 3xx: redirects are not
followed) is permanent (:class:`~integration.errors.FhirDeliveryError`). Logs and errors
carry the URL, status and OperationOutcome issue codes only, never the token or a
diagnostics text (which may quote the resource).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError
from pydicom.dataset import Dataset

from integration.destinations import FhirDestination
from integration.errors import FhirBuildError, FhirDeliveryError
from integration.uids import device_uid as default_device_uid

__all__ = [
    "DICOM_UID_SYSTEM",
    "DRAFT_STATUS",
    "R4_REPORT_STATUSES",
    "WITHDRAWN_STATUS",
    "FhirDestination",
    "FhirDraft",
    "FhirResult",
    "build_draft_bundle",
    "build_withdrawal_bundle",
    "check_bundle",
    "send_transaction",
    "update_conditional",
]

LOGGER = logging.getLogger(__name__)

DRAFT_STATUS = "partial"
"""DiagnosticReport.status of an unverified AI draft (see the module text)."""
WITHDRAWN_STATUS = "entered-in-error"
R4_REPORT_STATUSES = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
DICOM_UID_SYSTEM = "urn:dicom:uid"
LOINC = "http://loinc.org"
REPORT_CODE = ("18748-4", "Diagnostic imaging study")
DRAFT_WARNING = "AI-generated DRAFT, not verified by a radiologist. Not for diagnosis."
DEMO_WARNING = (
    "DEMO MODEL: randomly initialised weights. This text is meaningless and must not be "
    "used for any clinical purpose."
)
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_BUNDLE_TYPES = frozenset(
    {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    }
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})
_DEVICE_NAME_TYPES = frozenset(
    {
        "udi-label-name",
        "user-friendly-name",
        "patient-reported-name",
        "manufacturer-name",
        "model-name",
        "other",
    }
)
# Allowed reference targets (R4 DiagnosticReport, Provenance)
_TARGETS: dict[tuple[str, str], frozenset[str]] = {
    ("DiagnosticReport", "subject"): frozenset({"Patient", "Group", "Device", "Location"}),
    ("DiagnosticReport", "basedOn"): frozenset(
        {
            "CarePlan",
            "ImmunizationRecommendation",
            "MedicationRequest",
            "NutritionOrder",
            "ServiceRequest",
        }
    ),
    ("DiagnosticReport", "imagingStudy"): frozenset({"ImagingStudy"}),
    ("DiagnosticReport", "performer"): frozenset(
        {"Practitioner", "PractitionerRole", "Organization", "CareTeam"}
    ),
    ("DiagnosticReport", "resultsInterpreter"): frozenset(
        {"Practitioner", "PractitionerRole", "Organization", "CareTeam"}
    ),
}
_AGENT_WHO = frozenset(
    {"Practitioner", "PractitionerRole", "RelatedPerson", "Patient", "Device", "Organization"}
)
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:llm-cxr-node:fhir")


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


@dataclass(frozen=True, slots=True)
class FhirResult:
    """A delivered interaction: HTTP status and the Location(s) the server reported."""

    http_status: int
    locations: tuple[str, ...] = ()


# --- building -----------------------------------------------------------------------------


def build_draft_bundle(
    source: Dataset,
    draft: FhirDraft,
    *,
    patient_id_system: str | None = None,
    accession_system: str | None = None,
    local_timezone: dt.tzinfo | None = None,
) -> dict[str, Any]:
    """Build the transaction Bundle (Device + DiagnosticReport + Provenance) of a draft.

    Parameters
    ----------
    source
        The image the model read (header is enough).
    draft
        Text, identifiers and author.
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

    Returns
    -------
    dict
        The Bundle as JSON-ready data, validated by :func:`check_bundle`.

    Raises
    ------
    integration.errors.FhirBuildError
        Empty impression or patient ID, a naive ``issued``, invalid UIDs, or a Bundle that
        does not validate.
    """
    return _bundle(
        source,
        draft,
        patient_id_system,
        accession_system,
        local_timezone,
        withdrawal_reason=None,
    )


def build_withdrawal_bundle(
    source: Dataset,
    draft: FhirDraft,
    *,
    reason: str,
    patient_id_system: str | None = None,
    accession_system: str | None = None,
    local_timezone: dt.tzinfo | None = None,
) -> dict[str, Any]:
    """Build the transaction Bundle that marks a sent draft ``entered-in-error``.

    Parameters
    ----------
    source, patient_id_system, accession_system, local_timezone
        As for :func:`build_draft_bundle` (same values as the draft's, so the conditional
        update finds the same report).
    draft
        The draft as it was sent; ``issued`` is the time of the withdrawal.
    reason
        Why it is withdrawn (narrative; no patient data).

    Returns
    -------
    dict
        A transaction Bundle with one entry: the conditional PUT of the report with status
        ``entered-in-error``.

    Raises
    ------
    integration.errors.FhirBuildError
        As for :func:`build_draft_bundle`, or an empty reason.
    """
    if not reason or not reason.strip():
        raise FhirBuildError("a withdrawal needs a reason")
    return _bundle(
        source,
        draft,
        patient_id_system,
        accession_system,
        local_timezone,
        withdrawal_reason=reason.strip(),
    )


def _bundle(
    source: Dataset,
    draft: FhirDraft,
    patient_id_system: str | None,
    accession_system: str | None,
    local_timezone: dt.tzinfo | None,
    *,
    withdrawal_reason: str | None,
) -> dict[str, Any]:
    if not draft.impression.strip():
        raise FhirBuildError("impression text is empty")
    if draft.issued.tzinfo is None or draft.issued.utcoffset() is None:
        raise FhirBuildError("issued must be timezone-aware (FHIR instant)")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", draft.sr_sop_instance_uid):
        raise FhirBuildError("sr_sop_instance_uid is not a DICOM UID")
    study_uid = _text(source, "StudyInstanceUID")
    if not study_uid:
        raise FhirBuildError("source has no Study Instance UID")
    device_uid = draft.device_uid or default_device_uid(draft.model_name, draft.model_version)
    device_url = _urn("device", device_uid)
    report_url = _urn("report", draft.sr_sop_instance_uid)
    issued = draft.issued.isoformat(timespec="seconds")
    withdraw = withdrawal_reason is not None

    device: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{device_uid}"}],
        "status": "active",
        "manufacturer": draft.manufacturer,
        "deviceName": [{"name": draft.model_name, "type": "model-name"}],
        "type": {"text": "AI algorithm: chest X-ray report drafting"},
        "version": [{"value": draft.model_version}],
    }
    if draft.demo:
        device["note"] = [{"text": DEMO_WARNING}]

    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": {"security": [dict(_AI_ASSERTED)]},
        "text": {"status": "generated", "div": _narrative(draft, withdrawal_reason)},
        "identifier": [
            {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{draft.sr_sop_instance_uid}"}
        ],
        "status": WITHDRAWN_STATUS if withdraw else DRAFT_STATUS,
        "category": [{"coding": [{"system": _V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {
            "coding": [{"system": LOINC, "code": REPORT_CODE[0], "display": REPORT_CODE[1]}],
            "text": "AI-generated draft radiology report (not verified)",
        },
        "subject": {
            "type": "Patient",
            "identifier": _patient_identifier(source, patient_id_system),
        },
        "issued": issued,
        "imagingStudy": [
            {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"},
            }
        ],
    }
    effective = _effective(source, local_timezone)
    if effective:
        report["effectiveDateTime"] = effective
    accession = _accession_identifier(source, accession_system)
    if accession is not None:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": accession}]
    if not withdraw:
        report["conclusion"] = draft.impression.strip()
        if draft.pdf is not None:
            report["presentedForm"] = [
                {
                    "contentType": "application/pdf",
                    "language": "en",
                    "data": base64.b64encode(draft.pdf).decode("ascii"),
                    "title": "AI-generated DRAFT report (not verified)",
                    "creation": issued,
                }
            ]

    report_entry = {
        "fullUrl": report_url,
        "resource": report,
        "request": {
            "method": "PUT",
            "url": _conditional("DiagnosticReport", f"urn:oid:{draft.sr_sop_instance_uid}"),
        },
    }
    if withdraw:
        # the server's version history keeps the draft and its Provenance; no new author
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction"}
        bundle["entry"] = [report_entry]
        check_bundle(bundle)
        return bundle

    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "target": [{"reference": report_url, "type": "DiagnosticReport"}],
        "recorded": issued,
        "activity": {
            "coding": [{"system": _DATA_OPERATION, "code": "CREATE", "display": "create"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [{"system": _PARTICIPANT_TYPE, "code": "author", "display": "Author"}]
                },
                "who": {"reference": device_url, "type": "Device"},
            }
        ],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": device_url,
                "resource": device,
                "request": {
                    "method": "PUT",
                    "url": _conditional("Device", f"urn:oid:{device_uid}"),
                },
            },
            report_entry,
            {
                "fullUrl": _urn("provenance", draft.sr_sop_instance_uid, issued),
                "resource": provenance,
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }
    check_bundle(bundle)
    return bundle


def check_bundle(bundle: Mapping[str, Any]) -> Bundle:
    """Validate a Bundle with fhir.resources (R4B) and the rules it does not enforce.

    Parameters
    ----------
    bundle
        Bundle JSON data.

    Returns
    -------
    fhir.resources.R4B.bundle.Bundle
        The parsed model.

    Raises
    ------
    integration.errors.FhirBuildError
        Structure errors (pydantic: the message names the element paths, not values), a
        status outside R4's DiagnosticReport statuses, an unknown Bundle type, request
        method or Device name type, or a reference to a resource type the element does not
        allow (resolving ``urn:uuid`` references inside the Bundle).
    """
    try:
        model = Bundle.model_validate(dict(bundle))
    except ValidationError as exc:
        paths = sorted({".".join(str(p) for p in err["loc"]) for err in exc.errors()})
        raise FhirBuildError(f"Bundle does not validate at: {', '.join(paths)[:500]}") from None
    if bundle.get("type") not in _BUNDLE_TYPES:
        raise FhirBuildError(f"Bundle.type {bundle.get('type')!r} is not a Bundle type")
    entries = list(bundle.get("entry") or [])
    types_by_url = {
        str(e.get("fullUrl")): str((e.get("resource") or {}).get("resourceType"))
        for e in entries
        if e.get("fullUrl")
    }
    for index, entry in enumerate(entries):
        request = entry.get("request")
        if bundle.get("type") in ("transaction", "batch") and (
            not request or request.get("method") not in _METHODS
        ):
            raise FhirBuildError(f"Bundle.entry[{index}].request.method is missing or invalid")
        resource = entry.get("resource") or {}
        kind = resource.get("resourceType")
        if kind == "DiagnosticReport":
            status = resource.get("status")
            if status not in R4_REPORT_STATUSES:
                raise FhirBuildError(f"DiagnosticReport.status {status!r} is not an R4 code")
            for (resource_type, element), allowed in _TARGETS.items():
                if resource_type != kind:
                    continue
                for ref in _references(resource.get(element)):
                    _check_target(ref, allowed, f"DiagnosticReport.{element}", types_by_url)
        elif kind == "Provenance":
            for agent in resource.get("agent") or []:
                _check_target(
                    agent.get("who") or {}, _AGENT_WHO, "Provenance.agent.who", types_by_url
                )
        elif kind == "Device":
            for name in resource.get("deviceName") or []:
                if name.get("type") not in _DEVICE_NAME_TYPES:
                    raise FhirBuildError(f"Device.deviceName.type {name.get('type')!r} is invalid")
    return model


def _references(value: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        yield value
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping):
                yield item


def _check_target(
    ref: Mapping[str, Any], allowed: frozenset[str], where: str, types_by_url: dict[str, str]
) -> None:
    reference = str(ref.get("reference") or "")
    kinds = set()
    if ref.get("type"):
        kinds.add(str(ref["type"]))
    if reference in types_by_url:
        kinds.add(types_by_url[reference])
    elif re.match(r"^[A-Z][A-Za-z]+/", reference):
        kinds.add(reference.split("/", 1)[0])
    if not kinds:
        raise FhirBuildError(f"{where}: reference without a resolvable type")
    if not kinds <= allowed:
        raise FhirBuildError(
            f"{where} may refer to {', '.join(sorted(allowed))}, not {', '.join(sorted(kinds))}"
        )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, chr(31).join(parts))}"


def _conditional(resource_type: str, value: str) -> str:
    return f"{resource_type}?" + urlencode({"identifier": f"{DICOM_UID_SYSTEM}|{value}"})


def _issuer_system(item: Dataset | None) -> str | None:
    if item is None:
        return None
    entity = _text(item, "UniversalEntityID")
    kind = _text(item, "UniversalEntityIDType")
    if entity and kind == "ISO" and re.fullmatch(r"[0-9]+(\.[0-9]+)*", entity):
        return f"urn:oid:{entity}"
    if entity and kind == "UUID":
        return f"urn:uuid:{entity.lower()}"
    if entity and kind == "URI":
        return entity
    return None


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    items = ds.get(keyword)
    return items[0] if items else None


def _patient_identifier(ds: Dataset, system: str | None) -> dict[str, Any]:
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        raise FhirBuildError("Patient ID (0010,0020) is empty: the subject cannot be named")
    identifier: dict[str, Any] = {
        "type": {
            "coding": [{"system": _V2_0203, "code": "MR", "display": "Medical record number"}]
        },
        "value": patient_id,
    }
    system = system or _issuer_system(_first(ds, "IssuerOfPatientIDQualifiersSequence"))
    if system:
        identifier["system"] = system
    issuer = _text(ds, "IssuerOfPatientID")
    if issuer:
        identifier["assigner"] = {"display": issuer}
    return identifier


def _accession_identifier(ds: Dataset, system: str | None) -> dict[str, Any] | None:
    accession = _text(ds, "AccessionNumber")
    if not accession:
        return None
    identifier: dict[str, Any] = {
        "type": {"coding": [{"system": _V2_0203, "code": "ACSN", "display": "Accession ID"}]},
        "value": accession,
    }
    issuer = _first(ds, "IssuerOfAccessionNumberSequence")
    system = system or _issuer_system(issuer)
    if system:
        identifier["system"] = system
    if issuer is not None and _text(issuer, "LocalNamespaceEntityID"):
        identifier["assigner"] = {"display": _text(issuer, "LocalNamespaceEntityID")}
    return identifier


def _effective(ds: Dataset, local_timezone: dt.tzinfo | None) -> str:
    date = _text(ds, "StudyDate")
    if not re.fullmatch(r"\d{8}", date):
        return ""
    day = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    time = re.sub(r"\D", "", _text(ds, "StudyTime").split(".")[0])
    if len(time) not in (4, 6):
        return day
    time = time.ljust(6, "0")
    offset = _text(ds, "TimezoneOffsetFromUTC")
    zone: dt.tzinfo | None = None
    if re.fullmatch(r"[+-]\d{4}", offset):
        sign = 1 if offset[0] == "+" else -1
        zone = dt.timezone(sign * dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:])))
    elif local_timezone is not None:
        zone = local_timezone
    if zone is None:
        return day  # a dateTime with a time needs a zone (FHIR R4 dateTime)
    try:
        naive = dt.datetime.strptime(date + time, "%Y%m%d%H%M%S")
    except ValueError:
        return day
    return naive.replace(tzinfo=zone).isoformat(timespec="seconds")


def _narrative(draft: FhirDraft, withdrawal_reason: str | None) -> str:
    def para(text: str) -> str:
        return "<p>" + html.escape(text, quote=False).replace("\n", "<br/>") + "</p>"

    parts = []
    if withdrawal_reason is not None:
        parts.append(
            "<p><b>WITHDRAWN: this AI-generated draft is wrong and must not be used.</b> "
            + html.escape(f"Reason: {withdrawal_reason}", quote=False)
            + "</p>"
        )
    parts.append(f"<p><b>{html.escape(DRAFT_WARNING, quote=False)}</b></p>")
    parts.append(para(f"Model: {draft.model_name} {draft.model_version}"))
    if draft.demo:
        parts.append(f"<p><b>{html.escape(DEMO_WARNING, quote=False)}</b></p>")
    if withdrawal_reason is None:
        if draft.findings and draft.findings.strip():
            parts.append("<h3>Findings</h3>" + para(draft.findings.strip()))
        parts.append("<h3>Impression</h3>" + para(draft.impression.strip()))
    return '<div xmlns="http://www.w3.org/1999/xhtml">' + "".join(parts) + "</div>"


# --- sending ------------------------------------------------------------------------------


def send_transaction(
    bundle: Mapping[str, Any],
    dest: FhirDestination,
    *,
    client: httpx.Client | None = None,
) -> FhirResult:
    """POST a transaction Bundle to the server's base URL (FHIR RESTful API, transaction).

    Parameters
    ----------
    bundle
        From :func:`build_draft_bundle` / :func:`build_withdrawal_bundle`.
    dest
        The server.
    client
        An httpx client to reuse (its own timeout/verify settings apply); default a new one.

    Returns
    -------
    FhirResult
        HTTP status and each ``entry.response.location`` of a transaction-response Bundle.

    Raises
    ------
    integration.errors.FhirDeliveryError
        Not 2xx, a timeout or a connection error; ``transient`` per the module text.
    """
    return _request("POST", dest.base_url.rstrip("/"), bundle, dest, client, what="transaction")


def update_conditional(
    resource: Mapping[str, Any],
    dest: FhirDestination,
    *,
    identifier: tuple[str, str],
    client: httpx.Client | None = None,
) -> FhirResult:
    """PUT one resource with a conditional update on its identifier (FHIR RESTful API).

    Parameters
    ----------
    resource
        E.g. the DiagnosticReport entry of a withdrawal Bundle.
    dest
        The server.
    identifier
        ``(system, value)`` searched for: ``PUT [type]?identifier=system|value`` (200 when
        one match was updated, 201 when none existed and it was created, 412 when several
        match).
    client
        As in :func:`send_transaction`.

    Returns
    -------
    FhirResult
        HTTP status and the ``Location``/``Content-Location`` header.

    Raises
    ------
    integration.errors.FhirDeliveryError
        As for :func:`send_transaction`.
    """
    kind = str(resource.get("resourceType") or "")
    if not re.fullmatch(r"[A-Z][A-Za-z]+", kind):
        raise FhirBuildError("resource has no resourceType")
    query = urlencode({"identifier": f"{identifier[0]}|{identifier[1]}"})
    return _request(
        "PUT", f"{dest.base_url.rstrip('/')}/{kind}?{query}", resource, dest, client, what=kind
    )


def _request(
    method: str,
    url: str,
    body: Mapping[str, Any],
    dest: FhirDestination,
    client: httpx.Client | None,
    *,
    what: str,
) -> FhirResult:
    headers = {
        "Content-Type": "application/fhir+json; charset=utf-8",
        "Accept": "application/fhir+json",
    }
    if dest.bearer_token:
        headers["Authorization"] = f"Bearer {dest.bearer_token}"
    own = client is None
    http = client or httpx.Client(timeout=dest.timeout, verify=dest.verify)
    try:
        response = http.request(method, url, json=dict(body), headers=headers)
    except httpx.TimeoutException as exc:
        raise FhirDeliveryError(
            f"FHIR {what} to {dest} timed out after {dest.timeout} s ({type(exc).__name__})"
        ) from None
    except httpx.HTTPError as exc:
        raise FhirDeliveryError(f"FHIR {what} to {dest} failed: {type(exc).__name__}") from None
    finally:
        if own:
            http.close()
    status = response.status_code
    if 200 <= status < 300:
        locations = _locations(response)
        LOGGER.info("FHIR %s %s to %s: HTTP %d", method, what, dest, status)
        return FhirResult(http_status=status, locations=locations)
    issues = _issue_codes(response)
    error = FhirDeliveryError(
        f"FHIR {what} to {dest} failed: HTTP {status}"
        + (f" (OperationOutcome issue codes: {', '.join(issues)})" if issues else ""),
        http_status=status,
    )
    LOGGER.warning(
        "FHIR %s %s to %s: HTTP %d (%s)",
        method,
        what,
        dest,
        status,
        "transient" if error.transient else "permanent",
    )
    raise error


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _locations(response: httpx.Response) -> tuple[str, ...]:
    data = _json(response)
    found: list[str] = []
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        for entry in data.get("entry") or []:
            location = ((entry or {}).get("response") or {}).get("location")
            if location:
                found.append(str(location))
    for header in ("Location", "Content-Location"):
        if header in response.headers:
            found.append(response.headers[header])
    return tuple(found)


def _issue_codes(response: httpx.Response) -> list[str]:
    data = _json(response)
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        return []
    codes = []
    for issue in data.get("issue") or []:
        if isinstance(issue, dict) and issue.get("code"):
            codes.append(f"{issue.get('severity', '?')}/{issue['code']}")
    return codes[:10]
