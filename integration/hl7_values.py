"""HL7 v2.5.1 data types filled from a DICOM image header, for the ORU^R01 builder.

Each function returns ER7 text with the v2.5.1 delimiters (``|^~\\&``) of
:mod:`integration.hl7_oru`: values are escaped per HL7 v2.5.1 section 2.7 (:func:`escape`);
components that are empty at the end of a field are dropped (section 2.5.3). Sources:
PS3.3 C.7.1.1 (Patient) and C.7.2.1 / C.4.10 (Study, Requested Procedure).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from integration.errors import Hl7BuildError
from integration.header_values import header_text, study_time_digits, utc_offset

__all__ = [
    "digits",
    "escape",
    "order_number",
    "patient_identifier",
    "patient_names",
    "service",
    "study_ts",
    "text_field",
    "ts",
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
"""C0 control characters and DEL: none may stand in an HL7 text value (see :func:`escape`)."""
_UNIVERSAL_ID_TYPES = {  # DICOM Universal Entity ID Type -> HL7 table 0301
    "ISO": "ISO",
    "DNS": "DNS",
    "UUID": "UUID",
    "URI": "URI",
    "X400": "x400",
    "X500": "x500",
}


def escape(text: str) -> str:
    """Escape HL7 delimiters in a text value (v2.5.1 section 2.7); control characters
    become spaces.

    A run of C0 control characters or DEL (CR, LF, TAB, VT, FS, BEL, ESC ...) is one
    space: CR ends a segment (section 2.5.1), VT (0x0B) and FS (0x1C) are the MLLP start
    and end block, which the message must not contain (MLLP release 1 block format), and
    ST, TX and FT carry printable, displayable text (data types, Appendix 2.A). A reason
    pasted from a word processor (VT is its line break) thus still frames.
    """
    out = text.replace("\\", "\\E\\")
    for char, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, seq)
    return _CONTROL.sub(" ", out)


def text_field(text: str) -> str:
    """A stripped, escaped field value, or ``""`` for no text."""
    return escape(text.strip()) if text else ""


def digits(ds: Dataset, keyword: str, size: int) -> str:
    """The value of ``keyword`` when it is exactly ``size`` digits (e.g. a DA), else ``""``."""
    value = header_text(ds, keyword)
    return value if len(value) == size and value.isdigit() else ""


def ts(when: dt.datetime) -> str:
    """HL7 TS (DTM) with seconds and UTC offset, e.g. ``20240506070809+0000``."""
    return when.strftime("%Y%m%d%H%M%S%z")


def study_ts(ds: Dataset) -> str:
    """OBR-7 (TS): Study Date, with Study Time (HH, HHMM or HHMMSS) and UTC offset if known.

    Empty without a full Study Date (0008,0020); the Timezone Offset From UTC (0008,0201)
    is appended only after a time (a TS offset needs a time, HL7 v2.5.1 section 2.A.79).
    """
    date = digits(ds, "StudyDate", 8)
    if not date:
        return ""
    time = study_time_digits(ds)
    time = time if len(time) in (2, 4, 6) else ""
    return date + time + (utc_offset(ds) if time else "")


def order_number(ds: Dataset, keyword: str) -> str:
    """Placer or Filler Order Number (ORC-2/OBR-2, ORC-3/OBR-3) of the order ``ds`` is for.

    ``keyword`` is ``PlacerOrderNumberImagingServiceRequest`` (0040,2016) or
    ``FillerOrderNumberImagingServiceRequest`` (0040,2017): the image's own value, else that
    of the first Referenced Request Sequence (0040,A370) item that has one. The node's draft
    SR keeps the order numbers only there (PS3.3 C.17.2.2), so a message built from the SR
    (a withdrawal once the image is gone) names the same order as the draft's did.
    """
    value = header_text(ds, keyword)
    if value:
        return value
    for request in ds.get("ReferencedRequestSequence") or []:
        value = header_text(request, keyword)
        if value:
            return value
    return ""


def patient_identifier(ds: Dataset) -> str:
    """PID-3 (CX): ID ^^^ assigning authority (HD) [^ identifier type code]."""
    patient_id = header_text(ds, "PatientID")
    if not patient_id:
        raise Hl7BuildError("Patient ID (0010,0020) is empty: PID-3 is required")
    namespace = header_text(ds, "IssuerOfPatientID")
    universal, universal_type, type_code = "", "", ""
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
    if qualifiers:
        item = qualifiers[0]
        universal = header_text(item, "UniversalEntityID")
        universal_type = _UNIVERSAL_ID_TYPES.get(header_text(item, "UniversalEntityIDType"), "")
        type_code = header_text(item, "IdentifierTypeCode")
    authority = "&".join(escape(v) for v in (namespace, universal, universal_type)).rstrip("&")
    parts = [escape(patient_id), "", "", authority, escape(type_code)]
    return "^".join(parts).rstrip("^")


def patient_names(value: object) -> list[str]:
    """PID-5 (XPN) repetitions: one per non-empty PN group (XPN-8, table 0465: A/I/P)."""
    if value is None or not str(value).strip():
        return []
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    groups = [("A", name), ("I", name.ideographic), ("P", name.phonetic)]
    repetitions: list[str] = []
    for code, group in groups:
        pn = group if isinstance(group, PersonName) else PersonName(str(group or ""))
        components = [
            pn.family_name,
            pn.given_name,
            pn.middle_name,
            pn.name_suffix,  # XPN-4 suffix, XPN-5 prefix: DICOM has prefix before suffix
            pn.name_prefix,
        ]
        if not any(c.strip() for c in components):
            continue
        xpn = [escape(c.strip()) for c in components] + ["", ""]
        if len([g for _, g in groups if str(g or "").strip()]) > 1:
            xpn.append(code)  # XPN-8 name representation code
        repetitions.append("^".join(xpn).rstrip("^"))
    return repetitions


def service(ds: Dataset) -> str:
    """OBR-4 (CE): requested procedure code, else procedure code, else the description."""
    for item in _code_items(ds):
        code = header_text(item, "CodeValue")
        scheme = header_text(item, "CodingSchemeDesignator")
        if code and scheme:
            return "^".join(escape(v) for v in (code, header_text(item, "CodeMeaning"), scheme))
    description = header_text(ds, "RequestedProcedureDescription") or header_text(
        ds, "StudyDescription"
    )
    return "^" + escape(description or "Chest X-ray")


def _code_items(ds: Dataset) -> Sequence[Dataset]:
    """Code items in order: Requested Procedure Code of each request (Request Attributes
    Sequence of an image, or Referenced Request Sequence of an SR), then of the image, then
    Procedure Code Sequence (PS3.3 C.4.10, C.17.2.2, C.7.2.1 / C.4.11)."""
    items: list[Dataset] = []
    requests = [*(ds.get("RequestAttributesSequence") or [])]
    requests += ds.get("ReferencedRequestSequence") or []
    for request in requests:
        items.extend(request.get("RequestedProcedureCodeSequence") or [])
    items.extend(ds.get("RequestedProcedureCodeSequence") or [])
    items.extend(ds.get("ProcedureCodeSequence") or [])
    return items
