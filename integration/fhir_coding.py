"""Codings, identifiers and Bundle entries shared by the FHIR R4 report builders.

Used by :mod:`integration.fhir_report` (the draft) and :mod:`integration.fhir_withdrawal`
(its withdrawal):

- DICOM UIDs as FHIR identifiers: system ``urn:dicom:uid``, value ``urn:oid:<UID>`` (FHIR
  R4 "Identifier Systems" and DICOM PS3.18 / IHE IDR), also as the search of a
  conditional update (FHIR R4 RESTful API 3.1.0.4.3, ``[type]?identifier=system|value``);
- the patient and accession identifiers (v2-0203 ``MR`` / ``ACSN``) with the system taken
  from the Issuer of Patient ID Qualifiers / Issuer of Accession Number Sequence (DICOM
  PS3.3 C.7.1.1, C.7.2.1; Universal Entity ID types ISO, UUID, URI);
- ``effectiveDateTime`` from Study Date/Time (a dateTime with a time needs a zone, FHIR R4
  2.24.0.10 dateTime);
- ``urn:uuid`` fullUrls derived from the content, so a rebuilt Bundle is the same Bundle.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any
from urllib.parse import urlencode

from pydicom.dataset import Dataset

from integration.errors import FhirBuildError
from integration.header_values import header_text, study_time_digits, utc_offset

__all__ = [
    "AI_ASSERTED",
    "DATA_OPERATION",
    "DICOM_UID_SYSTEM",
    "LOINC",
    "PARTICIPANT_TYPE",
    "REPORT_CODE",
    "V2_0074",
    "accession_identifier",
    "bundle_entry",
    "coding",
    "conditional_url",
    "dicom_uid_identifier",
    "effective_datetime",
    "entry_urn",
    "is_dicom_uid",
    "issuer_system",
    "patient_identifier",
]

DICOM_UID_SYSTEM = "urn:dicom:uid"
LOINC = "http://loinc.org"
REPORT_CODE = ("18748-4", "Diagnostic imaging study")
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
"""meta.security label of AI output (HL7 AI Transparency on FHIR IG, a ballot); copy it."""
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:llm-cxr-node:fhir")
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def coding(system: str, code: str, display: str) -> dict[str, str]:
    """A FHIR R4 Coding (2.24.0.13) as JSON data: ``system``, ``code``, ``display``."""
    return {"system": system, "code": code, "display": display}


def is_dicom_uid(value: str) -> bool:
    """Whether ``value`` is dot-separated digits, the form of a DICOM UID (PS3.5 9.1)."""
    return _DICOM_UID.fullmatch(value) is not None


def dicom_uid_identifier(uid: str) -> dict[str, str]:
    """A FHIR Identifier for a DICOM UID: system ``urn:dicom:uid``, value ``urn:oid:<uid>``."""
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def conditional_url(resource_type: str, uid: str) -> str:
    """The request URL of a conditional update on a DICOM UID identifier.

    Parameters
    ----------
    resource_type
        E.g. ``"DiagnosticReport"``.
    uid
        The DICOM UID the resource is identified by.

    Returns
    -------
    str
        ``<resource_type>?identifier=urn%3Adicom%3Auid%7Curn%3Aoid%3A<uid>`` (FHIR R4
        RESTful API, conditional update).
    """
    query = urlencode({"identifier": f"{DICOM_UID_SYSTEM}|urn:oid:{uid}"})
    return f"{resource_type}?" + query


def entry_urn(*parts: str) -> str:
    """A ``urn:uuid`` fullUrl (FHIR R4 Bundle.entry.fullUrl) derived only from ``parts``."""
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, chr(31).join(parts))}"


def bundle_entry(full_url: str, resource: dict[str, Any], method: str, url: str) -> dict[str, Any]:
    """A transaction Bundle entry: fullUrl, resource and request (FHIR R4 Bundle 2.36)."""
    return {"fullUrl": full_url, "resource": resource, "request": {"method": method, "url": url}}


def issuer_system(item: Dataset | None) -> str | None:
    """Identifier.system from an issuer item (Universal Entity ID and its type, PS3.3 10.14).

    Parameters
    ----------
    item
        An item of Issuer of Patient ID Qualifiers / Issuer of Accession Number Sequence,
        or ``None``.

    Returns
    -------
    str or None
        ``urn:oid:<id>`` for type ISO (a valid OID), ``urn:uuid:<id>`` (lower case) for
        UUID, the URI itself for URI; ``None`` otherwise.
    """
    if item is None:
        return None
    entity = header_text(item, "UniversalEntityID")
    kind = header_text(item, "UniversalEntityIDType")
    if entity and kind == "ISO" and is_dicom_uid(entity):
        return f"urn:oid:{entity}"
    if entity and kind == "UUID":
        return f"urn:uuid:{entity.lower()}"
    if entity and kind == "URI":
        return entity
    return None


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of sequence ``keyword``, or ``None``."""
    items = ds.get(keyword)
    return items[0] if items else None


def patient_identifier(ds: Dataset, system: str | None) -> dict[str, Any]:
    """The subject's identifier: type v2-0203 ``MR``, value Patient ID (0010,0020).

    Parameters
    ----------
    ds
        The image header.
    system
        Identifier.system; ``None`` takes it from the Issuer of Patient ID Qualifiers
        Sequence (0010,0024) (:func:`issuer_system`), or leaves it out.

    Returns
    -------
    dict
        The Identifier; ``assigner.display`` is Issuer of Patient ID (0010,0021) if any.

    Raises
    ------
    integration.errors.FhirBuildError
        Patient ID is empty.
    """
    patient_id = header_text(ds, "PatientID")
    if not patient_id:
        raise FhirBuildError("Patient ID (0010,0020) is empty: the subject cannot be named")
    identifier: dict[str, Any] = {
        "type": {"coding": [coding(V2_0203, "MR", "Medical record number")]},
        "value": patient_id,
    }
    system = system or issuer_system(_first(ds, "IssuerOfPatientIDQualifiersSequence"))
    if system:
        identifier["system"] = system
    issuer = header_text(ds, "IssuerOfPatientID")
    if issuer:
        identifier["assigner"] = {"display": issuer}
    return identifier


def accession_identifier(ds: Dataset, system: str | None) -> dict[str, Any] | None:
    """The order's identifier: type v2-0203 ``ACSN``, value Accession Number (0008,0050).

    Parameters
    ----------
    ds
        The image header.
    system
        Identifier.system; ``None`` takes it from the Issuer of Accession Number Sequence
        (0008,0051) (:func:`issuer_system`), or leaves it out.

    Returns
    -------
    dict or None
        The Identifier (``assigner.display`` the issuer's Local Namespace Entity ID if
        any), or ``None`` without an accession number.
    """
    accession = header_text(ds, "AccessionNumber")
    if not accession:
        return None
    identifier: dict[str, Any] = {
        "type": {"coding": [coding(V2_0203, "ACSN", "Accession ID")]},
        "value": accession,
    }
    issuer = _first(ds, "IssuerOfAccessionNumberSequence")
    system = system or issuer_system(issuer)
    if system:
        identifier["system"] = system
    if issuer is not None and header_text(issuer, "LocalNamespaceEntityID"):
        identifier["assigner"] = {"display": header_text(issuer, "LocalNamespaceEntityID")}
    return identifier


def effective_datetime(ds: Dataset, local_timezone: dt.tzinfo | None) -> str:
    """DiagnosticReport.effectiveDateTime from Study Date (0008,0020) and Time (0008,0030).

    Parameters
    ----------
    ds
        The image header.
    local_timezone
        Zone of the study when the header has no Timezone Offset From UTC (0008,0201).

    Returns
    -------
    str
        ``YYYY-MM-DDThh:mm:ss+zz:zz`` when the date, a time (HHMM or HHMMSS) and a zone
        are known; the date alone (``YYYY-MM-DD``) when the time or zone is not, since an
        R4 dateTime with a time needs a zone; ``""`` without a valid Study Date.
    """
    date = header_text(ds, "StudyDate")
    if not re.fullmatch(r"\d{8}", date):
        return ""
    day = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    time = study_time_digits(ds)
    if len(time) not in (4, 6):
        return day
    time = time.ljust(6, "0")
    offset = utc_offset(ds)
    zone: dt.tzinfo | None = local_timezone
    if offset:
        sign = 1 if offset[0] == "+" else -1
        zone = dt.timezone(sign * dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:])))
    if zone is None:
        return day  # a dateTime with a time needs a zone (FHIR R4 dateTime)
    try:
        naive = dt.datetime.strptime(date + time, "%Y%m%d%H%M%S")
    except ValueError:
        return day
    return naive.replace(tzinfo=zone).isoformat(timespec="seconds")
