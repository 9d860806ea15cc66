"""The AI draft report as an HL7 v2.5.1 ORU^R01 result message (hl7apy), and its ACK.

Message (HL7 v2.5.1 chapter 7, ORU^R01^ORU_R01; segments end with CR; fields abridged)::

    MSH|^~\\&|<app>|<facility>|<app>|<facility>|<time>||ORU^R01^ORU_R01|<id>|P|2.5.1|...
    PID|1||<Patient ID>^^^<issuer>&<OID>&ISO||<Family>^<Given>^<Middle>^<Sfx>^<Pfx>||<DOB>|<sex>
    ORC|RE|<placer order number>|<filler order number>
    OBR|1|<placer>|<filler>|<procedure code or ^description>|||<study date/time>|...
        OBR-18 <accession number>, OBR-22 <report time>, OBR-24 RAD, OBR-25 R
    NTE|1|O|AI-GENERATED DRAFT, NOT VERIFIED ... [DEMO MODEL ...]|RE
    OBX|1|TX|AI-DRAFT^AI-generated draft notice^L|1|AI-GENERATED DRAFT ...||||||R|...
        OBX-14 / OBX-19 <report time>, OBX-18 <model version>^<manufacturer>^<UID>^ISO
    OBX|2|TX|59776-5^Findings^LN|1|<findings line 1>||||||R|...
    OBX|n|TX|19005-8^Impression^LN|1|<impression line 1>||||||R|...

- **Result status R, not P.** The issue asked for P ("preliminary"), but HL7 table 0123
  defines P as "Preliminary: A verified early result is available, final results not yet
  obtained" and R as "Results stored; not yet verified"; table 0085 (OBX-11) has R
  "Results entered -- not verified" next to P "Preliminary results". Nobody has verified
  an AI draft, so OBR-25 = :data:`DRAFT_RESULT_STATUS` ``R``
  and OBX-11 = :data:`DRAFT_OBSERVATION_STATUS` ``R``.
- **Withdrawal.** The earlier draft's OBX lines are sent again (same order numbers, same
  OBX-3/OBX-4/OBX-5) with OBX-11 = :data:`WITHDRAWN_OBSERVATION_STATUS` ``W`` "Post original
  as wrong, e.g., transmitted for wrong patient": the receiver keeps them, marked wrong.
  ``D`` ("Deletes the OBX record") would erase the audit trail of a result that was shown,
  and ``C`` (0085) only replaces a *final* result. OBR-25 = :data:`WITHDRAWN_RESULT_STATUS`
  ``C`` "Correction to results": the order's results are being corrected; ``X`` "No
  results available; Order canceled" would cancel an order a radiologist still has to
  report. The NTE says "WITHDRAWN" and gives the reason.
- **Accession number** in OBR-18 (placer field 1), as IHE does for ORU (ORU has no IPC
  segment); Placer/Filler Order Number (0040,2016)/(0040,2017) of the image go to
  ORC-2/OBR-2 and ORC-3/OBR-3 when present.
- **The AI device**: OBX-18 Equipment Instance Identifier (EI) = model name and version ^
  manufacturer ^ Device Observer UID (as in the SR) ^ ``ISO``; OBX-16 (responsible observer)
  and OBR-32 (principal result interpreter) stay empty: no person has interpreted it.
- **The warning travels twice**: an NTE after the OBR, and a first TX OBX with a local code
  (``AI-DRAFT^AI-generated draft notice^L``) for receivers that drop NTE segments.
- Original acknowledgment mode (MSH-15/16 empty), Processing ID ``P``, character set
  ``UNICODE UTF-8`` (MSH-18). Text is escaped per HL7 v2.5.1 section 2.7 (``\\F\\ \\S\\ \\T\\
  \\R\\ \\E\\``) and the message is checked against hl7apy's 2.5.1 structure at STRICT
  validation before it is returned.

ACK handling (:func:`check_ack`, MSA-1 from HL7 table 0008, ERR-3 from table 0357):

| MSA-1 | ERR-3 | Outcome |
|---|---|---|
| AA, CA | any | delivered |
| AE, CE | 206 record locked, 207 application internal error | transient failure |
| AE, CE | other or none | permanent failure (the same message fails again) |
| AR, CR | 200-203 unsupported message type / event / processing ID / version | permanent |
| AR, CR | other or none (receiver down, internal reasons) | transient failure |
| none, unknown, MSA-2 not our control ID, not HL7 | - | transient failure |

MSA-3 and ERR-8 are free text the receiver wrote and may quote the message (patient data):
they are kept in :attr:`Hl7Ack.text` and never put into an exception message or a log line.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from integration.errors import Hl7AckError, Hl7BuildError
from integration.uids import device_uid as default_device_uid

__all__ = [
    "ACCEPTED_ACK_CODES",
    "AI_NOTICE_CODE",
    "DRAFT_OBSERVATION_STATUS",
    "DRAFT_RESULT_STATUS",
    "FINDINGS_CODE",
    "IMPRESSION_CODE",
    "WITHDRAWN_OBSERVATION_STATUS",
    "WITHDRAWN_RESULT_STATUS",
    "DraftResult",
    "Hl7Ack",
    "Hl7Parties",
    "build_draft_oru",
    "build_withdrawal_oru",
    "check_ack",
    "message_control_id",
    "parse_ack",
]

LOGGER = logging.getLogger(__name__)

VERSION = "2.5.1"
DRAFT_RESULT_STATUS = "R"
"""OBR-25 of a draft (table 0123 "Results stored; not yet verified"); see the module text."""
DRAFT_OBSERVATION_STATUS = "R"
"""OBX-11 of a draft (table 0085 "Results entered -- not verified")."""
WITHDRAWN_RESULT_STATUS = "C"
"""OBR-25 of a withdrawal (table 0123 "Correction to results")."""
WITHDRAWN_OBSERVATION_STATUS = "W"
"""OBX-11 of a withdrawal (table 0085 "Post original as wrong")."""
FINDINGS_CODE = ("59776-5", "Findings", "LN")
IMPRESSION_CODE = ("19005-8", "Impression", "LN")
AI_NOTICE_CODE = ("AI-DRAFT", "AI-generated draft notice", "L")
ACCEPTED_ACK_CODES = frozenset({"AA", "CA"})
DRAFT_NOTICE = (
    "AI-GENERATED DRAFT, NOT VERIFIED by a radiologist: produced automatically by {model} "
    "{version}. Preliminary, for review only, not for diagnosis."
)
DEMO_NOTICE = (
    "DEMO MODEL: randomly initialised weights. This text is meaningless and must not be "
    "used for any clinical purpose."
)
WITHDRAWN_NOTICE = (
    "WITHDRAWN: the AI-generated draft sent earlier for this order ({model} {version}) is "
    "wrong and must not be used."
)
_MAX_CONTROL_ID = 20  # MSH-10 (ST, 20 in v2.5.1)
_ENCODING_CHARS = "^~\\&"
_PERMANENT_REJECT = frozenset({"200", "201", "202", "203"})  # table 0357: unsupported ...
_TRANSIENT_ERROR = frozenset({"206", "207"})  # table 0357: record locked, internal error
_SEX = {"M": "M", "F": "F", "O": "O"}  # DICOM (0010,0040) -> HL7 table 0001
_UNIVERSAL_ID_TYPES = {  # DICOM Universal Entity ID Type -> HL7 table 0301
    "ISO": "ISO",
    "DNS": "DNS",
    "UUID": "UUID",
    "URI": "URI",
    "X400": "x400",
    "X500": "x500",
}


@dataclass(frozen=True, slots=True)
class Hl7Parties:
    """MSH-3 to MSH-6: who sends and who receives (HD namespace IDs, plain text).

    Parameters
    ----------
    sending_application, sending_facility, receiving_application, receiving_facility
        As agreed with the RIS interface team, e.g. ``"LLMCXR"``, ``"RADIOLOGY"``; the
        receiving ones may be empty (MSH-5 and MSH-6 are optional).
    """

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str

    def __post_init__(self) -> None:
        for name in ("sending_application", "sending_facility"):
            value = getattr(self, name)
            if not value or not value.strip() or len(value) > 227:
                raise ValueError(f"{name} must be 1-227 characters, got {value!r}")
        for name in ("receiving_application", "receiving_facility"):  # optional (MSH-5/6)
            if len(getattr(self, name)) > 227:
                raise ValueError(f"{name} must be at most 227 characters")


@dataclass(frozen=True, slots=True)
class DraftResult:
    """The draft's text and its author, as the ORU carries them.

    Parameters
    ----------
    impression
        Impression text (must not be empty); one OBX per line.
    findings
        Findings text, or ``None``/empty for no findings OBX.
    model_name, model_version
        The model (OBX-18, notices).
    demo
        DEMO model: the NTE and the notice OBX say so.
    report_time
        When the draft was produced (timezone-aware): OBR-22, OBX-14, OBX-19.
    manufacturer
        Namespace of OBX-18 (the node software).
    device_uid
        Universal ID of OBX-18; default :func:`integration.uids.device_uid` (the SR's
        Device Observer UID).
    """

    impression: str
    findings: str | None
    model_name: str
    model_version: str
    demo: bool
    report_time: dt.datetime
    manufacturer: str = "llm-cxr-node"
    device_uid: str | None = None


@dataclass(frozen=True, slots=True)
class Hl7Ack:
    """An acknowledgment (ACK) as received.

    Attributes
    ----------
    code
        MSA-1 (table 0008: AA, AE, AR, CA, CE, CR).
    control_id
        MSA-2, the control ID of the message acknowledged.
    error_codes
        ERR-3 identifiers (table 0357), or the code component of ERR-1 / MSA-6 in older
        versions.
    text
        MSA-3 and ERR-8 texts joined (may quote patient data: never log it).
    """

    code: str
    control_id: str
    error_codes: tuple[str, ...] = ()
    text: str = ""

    @property
    def accepted(self) -> bool:
        """Whether MSA-1 is AA (application accept) or CA (commit accept)."""
        return self.code in ACCEPTED_ACK_CODES


# --- building -----------------------------------------------------------------------------


def message_control_id(*parts: str) -> str:
    """A message control ID (MSH-10, <= 20 characters) derived from ``parts``.

    The same parts (e.g. SR SOP Instance UID, ``"draft"``/``"withdraw"``, attempt counter
    or revision) give the same ID, different parts a different one (SHA-256, base32).
    """
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError("message_control_id needs non-empty string parts")
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return "N" + base64.b32encode(digest).decode("ascii")[: _MAX_CONTROL_ID - 1]


def build_draft_oru(
    source: Dataset,
    result: DraftResult,
    parties: Hl7Parties,
    *,
    control_id: str,
    message_time: dt.datetime | None = None,
) -> str:
    """Build the ORU^R01 that carries the unverified AI draft (OBR-25/OBX-11 ``R``).

    Parameters
    ----------
    source
        The image the model read (header is enough): patient, order and study fields.
    result
        The draft text and its author.
    parties
        MSH-3 to MSH-6.
    control_id
        MSH-10: unique per send (see :func:`message_control_id`), 1-20 printable ASCII.
    message_time
        MSH-7 (timezone-aware); default now (UTC).

    Returns
    -------
    str
        The ER7 message, segments separated by CR, no MLLP framing; encode as UTF-8.

    Raises
    ------
    integration.errors.Hl7BuildError
        Empty impression, naive times, a bad control ID or a message hl7apy finds invalid.
    """
    return _build(source, result, parties, control_id, message_time, withdrawal_reason=None)


def build_withdrawal_oru(
    source: Dataset,
    result: DraftResult,
    parties: Hl7Parties,
    *,
    control_id: str,
    reason: str,
    message_time: dt.datetime | None = None,
) -> str:
    """Build the ORU^R01 that withdraws a draft sent earlier (OBR-25 ``C``, OBX-11 ``W``).

    Parameters
    ----------
    source, parties, message_time
        As for :func:`build_draft_oru` (same order numbers as the draft's message).
    result
        The draft as it was sent (its OBX lines are sent again, marked wrong).
    control_id
        A new MSH-10, different from the draft message's.
    reason
        Why it is withdrawn (NTE; no patient data), e.g. ``"sent for the wrong study"``.

    Returns
    -------
    str
        The ER7 message (CR-separated segments).

    Raises
    ------
    integration.errors.Hl7BuildError
        As for :func:`build_draft_oru`, or an empty reason.
    """
    if not reason or not reason.strip():
        raise Hl7BuildError("a withdrawal needs a reason")
    return _build(source, result, parties, control_id, message_time, withdrawal_reason=reason)


def _build(
    source: Dataset,
    result: DraftResult,
    parties: Hl7Parties,
    control_id: str,
    message_time: dt.datetime | None,
    *,
    withdrawal_reason: str | None,
) -> str:
    if not result.impression or not result.impression.strip():
        raise Hl7BuildError("impression text is empty")
    if not re.fullmatch(r"[\x21-\x7e]{1,20}", control_id) or any(
        c in control_id for c in "|" + _ENCODING_CHARS
    ):
        raise Hl7BuildError("MSH-10 control ID must be 1-20 printable ASCII, no delimiters")
    sent = message_time or dt.datetime.now(dt.UTC)
    for label, when in (("report_time", result.report_time), ("message_time", sent)):
        if when.tzinfo is None or when.utcoffset() is None:
            raise Hl7BuildError(f"{label} must be timezone-aware")
    for label, value in (("model_name", result.model_name), ("version", result.model_version)):
        if not value.strip():
            raise Hl7BuildError(f"{label} must not be empty")
    withdraw = withdrawal_reason is not None
    obr_status = WITHDRAWN_RESULT_STATUS if withdraw else DRAFT_RESULT_STATUS
    obx_status = WITHDRAWN_OBSERVATION_STATUS if withdraw else DRAFT_OBSERVATION_STATUS
    report_ts = _ts(result.report_time)
    device = result.device_uid or default_device_uid(result.model_name, result.model_version)

    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    try:
        msh = msg.msh
        msh.msh_3 = _field(parties.sending_application)
        msh.msh_4 = _field(parties.sending_facility)
        msh.msh_5 = _field(parties.receiving_application)
        msh.msh_6 = _field(parties.receiving_facility)
        msh.msh_7 = _ts(sent)
        msh.msh_9 = "ORU^R01^ORU_R01"
        msh.msh_10 = control_id
        msh.msh_11 = "P"
        msh.msh_12 = VERSION
        msh.msh_18 = "UNICODE UTF-8"

        patient_result: Group = msg.add_group("ORU_R01_PATIENT_RESULT")
        patient: Group = patient_result.add_group("ORU_R01_PATIENT")
        pid: Segment = patient.add_segment("PID")
        pid.pid_1 = "1"
        pid.pid_3 = _patient_identifier(source)
        for repetition in _patient_names(source.get("PatientName")):
            pid.add_field("PID_5").value = repetition
        birth = _digits(source, "PatientBirthDate", 8)
        if birth:
            pid.pid_7 = birth
        sex = _SEX.get(str(source.get("PatientSex", "") or "").strip().upper())
        if sex:
            pid.pid_8 = sex

        order: Group = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
        placer = _field(_text(source, "PlacerOrderNumberImagingServiceRequest"))
        filler = _field(_text(source, "FillerOrderNumberImagingServiceRequest"))
        orc: Segment = order.add_segment("ORC")
        orc.orc_1 = "RE"
        if placer:
            orc.orc_2 = placer
        if filler:
            orc.orc_3 = filler
        obr: Segment = order.add_segment("OBR")
        obr.obr_1 = "1"
        if placer:
            obr.obr_2 = placer
        if filler:
            obr.obr_3 = filler
        obr.obr_4 = _service(source)
        study_ts = _study_ts(source)
        if study_ts:
            obr.obr_7 = study_ts
        accession = _text(source, "AccessionNumber")
        if accession:
            obr.obr_18 = _escape(accession)
        obr.obr_22 = report_ts
        obr.obr_24 = "RAD"
        obr.obr_25 = obr_status

        notes = [DRAFT_NOTICE.format(model=result.model_name, version=result.model_version)]
        if result.demo:
            notes.append(DEMO_NOTICE)
        # a withdrawal says so in the NTE; its OBX lines are the draft's, marked W
        comment = " ".join(notes)
        if withdrawal_reason is not None:
            comment = (
                WITHDRAWN_NOTICE.format(model=result.model_name, version=result.model_version)
                + f" Reason: {withdrawal_reason.strip()}"
            )
        nte: Segment = order.add_segment("NTE")
        nte.nte_1 = "1"
        nte.nte_2 = "O"  # table 0105: other system
        nte.nte_3 = _escape(comment)
        nte.nte_4 = "RE"  # table 0364: remark

        equipment = "^".join(
            _escape(v)
            for v in (
                f"{result.model_name} {result.model_version}"[:199],
                result.manufacturer[:20],
                device,
                "ISO",
            )
        )
        lines: list[tuple[tuple[str, str, str], str]] = [(AI_NOTICE_CODE, line) for line in notes]
        lines += [(FINDINGS_CODE, line) for line in _lines(result.findings)]
        lines += [(IMPRESSION_CODE, line) for line in _lines(result.impression)]
        for set_id, (code, line) in enumerate(lines, start=1):
            observation: Group = order.add_group("ORU_R01_OBSERVATION")
            obx: Segment = observation.add_segment("OBX")
            obx.obx_1 = str(set_id)
            obx.obx_2 = "TX"
            obx.obx_3 = "^".join(_escape(c) for c in code)
            obx.obx_4 = "1"
            obx.obx_5 = _escape(line)
            obx.obx_11 = obx_status
            obx.obx_14 = report_ts
            obx.obx_18 = equipment
            obx.obx_19 = report_ts
        msg.validate()
        er7 = str(msg.to_er7())
    except Hl7BuildError:
        raise
    except Exception as exc:
        # hl7apy's messages quote the offending value (possibly patient data): not chained
        raise Hl7BuildError(
            f"the ORU^R01 does not fit the HL7 {VERSION} structure ({type(exc).__name__})"
        ) from None
    LOGGER.debug("built ORU^R01 %s (OBR-25 %s, %d OBX)", control_id, obr_status, len(lines))
    return er7


def _escape(text: str) -> str:
    """Escape HL7 delimiters in a text value (v2.5.1 section 2.7); CR/LF become spaces."""
    out = text.replace("\\", "\\E\\")
    for char, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, seq)
    return re.sub(r"[\r\n]+", " ", out)


def _field(text: str) -> str:
    return _escape(text.strip()) if text else ""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _digits(ds: Dataset, keyword: str, size: int) -> str:
    value = _text(ds, keyword)
    return value if len(value) == size and value.isdigit() else ""


def _ts(when: dt.datetime) -> str:
    """HL7 TS (DTM) with seconds and UTC offset, e.g. ``20240506070809+0000``."""
    return when.strftime("%Y%m%d%H%M%S%z")


def _study_ts(ds: Dataset) -> str:
    date = _digits(ds, "StudyDate", 8)
    if not date:
        return ""
    time = re.sub(r"\D", "", _text(ds, "StudyTime").split(".")[0])
    time = time[:6] if len(time) in (2, 4, 6) else ""
    offset = _text(ds, "TimezoneOffsetFromUTC")
    offset = offset if re.fullmatch(r"[+-]\d{4}", offset) else ""
    return date + time + (offset if time else "")


def _patient_identifier(ds: Dataset) -> str:
    """PID-3 (CX): ID ^^^ assigning authority (HD) [^ identifier type code]."""
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        raise Hl7BuildError("Patient ID (0010,0020) is empty: PID-3 is required")
    namespace = _text(ds, "IssuerOfPatientID")
    universal, universal_type, type_code = "", "", ""
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
    if qualifiers:
        item = qualifiers[0]
        universal = _text(item, "UniversalEntityID")
        universal_type = _UNIVERSAL_ID_TYPES.get(_text(item, "UniversalEntityIDType"), "")
        type_code = _text(item, "IdentifierTypeCode")
    authority = "&".join(_escape(v) for v in (namespace, universal, universal_type)).rstrip("&")
    parts = [_escape(patient_id), "", "", authority, _escape(type_code)]
    return "^".join(parts).rstrip("^")


def _patient_names(value: object) -> list[str]:
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
        xpn = [_escape(c.strip()) for c in components] + ["", ""]
        if len([g for _, g in groups if str(g or "").strip()]) > 1:
            xpn.append(code)  # XPN-8 name representation code
        repetitions.append("^".join(xpn).rstrip("^"))
    return repetitions


def _service(ds: Dataset) -> str:
    """OBR-4 (CE): requested procedure code, else procedure code, else the description."""
    for item in _code_items(ds):
        code = _text(item, "CodeValue")
        scheme = _text(item, "CodingSchemeDesignator")
        if code and scheme:
            return "^".join(_escape(v) for v in (code, _text(item, "CodeMeaning"), scheme))
    description = _text(ds, "RequestedProcedureDescription") or _text(ds, "StudyDescription")
    return "^" + _escape(description or "Chest X-ray")


def _code_items(ds: Dataset) -> Sequence[Dataset]:
    items: list[Dataset] = []
    for request in ds.get("RequestAttributesSequence") or []:
        items.extend(request.get("RequestedProcedureCodeSequence") or [])
    items.extend(ds.get("RequestedProcedureCodeSequence") or [])
    items.extend(ds.get("ProcedureCodeSequence") or [])
    return items


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


# --- acknowledgments ----------------------------------------------------------------------


def parse_ack(raw: bytes | str) -> Hl7Ack:
    """Read MSA and ERR of an HL7 v2 ACK (any v2.x; MLLP framing bytes are ignored).

    Parameters
    ----------
    raw
        The reply as received (bytes are decoded as UTF-8, invalid bytes replaced).

    Returns
    -------
    Hl7Ack
        MSA-1, MSA-2, ERR-3 codes (or ERR-1/MSA-6 codes), MSA-3/ERR-8 texts.

    Raises
    ------
    integration.errors.Hl7AckError
        Transient: no MSH segment, no MSA segment or an empty MSA-1.
    """
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = text.strip("\x0b\x1c\r\n ")
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7AckError("the reply is not an HL7 v2 message", ack_code=None, transient=True)
    field_sep = text[3]
    component_sep = text[4]
    subcomponent_sep = text[7] if len(text) > 7 and text[7] != field_sep else "&"
    segments = [s for s in re.split(r"[\r\n]+", text) if s]
    msa = next((s.split(field_sep) for s in segments if s.startswith("MSA" + field_sep)), None)
    if msa is None or len(msa) < 2 or not msa[1].strip():
        raise Hl7AckError("the reply has no MSA segment / MSA-1", ack_code=None, transient=True)

    def component(fields: list[str], index: int, comp: int = 0) -> str:
        if index >= len(fields):
            return ""
        parts = fields[index].split(component_sep)
        return parts[comp].strip() if comp < len(parts) else ""

    codes: list[str] = []
    texts = [msa[3].strip()] if len(msa) > 3 and msa[3].strip() else []
    if component(msa, 6):
        codes.append(component(msa, 6))
    for segment in segments:
        if not segment.startswith("ERR" + field_sep):
            continue
        err = segment.split(field_sep)
        code = component(err, 3)
        if not code:  # v2.3-2.4: ERR-1 (ELD) segment^sequence^field^code&text&system
            code = component(err, 1, 3).split(subcomponent_sep)[0].strip()
        if code:
            codes.append(code)
        if len(err) > 8 and err[8].strip():
            texts.append(err[8].strip())
    return Hl7Ack(
        code=msa[1].strip().upper(),
        control_id=component(msa, 2),
        error_codes=tuple(codes),
        text=" | ".join(texts),
    )


def check_ack(raw: bytes | str, *, control_id: str) -> Hl7Ack:
    """Decide whether the receiver took the message (see the table in the module text).

    Parameters
    ----------
    raw
        The reply (e.g. from :func:`integration.mllp.send_mllp`).
    control_id
        MSH-10 of the message sent; MSA-2 must equal it.

    Returns
    -------
    Hl7Ack
        The ACK, when MSA-1 is AA or CA.

    Raises
    ------
    integration.errors.Hl7AckError
        AE/AR/CE/CR (``transient`` per the table), or a malformed, foreign or empty ACK
        (transient). Its message names MSA-1, the control ID and ERR-3 codes only.
    """
    ack = parse_ack(raw)
    if ack.control_id != control_id:
        raise Hl7AckError(
            f"the ACK acknowledges control ID {ack.control_id!r}, not {control_id!r}",
            ack_code=ack.code,
            error_codes=ack.error_codes,
            transient=True,
        )
    if ack.accepted:
        LOGGER.info("HL7 message %s accepted (MSA-1 %s)", control_id, ack.code)
        return ack
    codes = set(ack.error_codes)
    if ack.code in ("AE", "CE"):
        transient = bool(codes & _TRANSIENT_ERROR)
    elif ack.code in ("AR", "CR"):
        transient = not codes & _PERMANENT_REJECT
    else:
        transient = True
    kind = "transient" if transient else "permanent"
    LOGGER.warning(
        "HL7 message %s not accepted: MSA-1 %s, ERR-3 %s (%s)",
        control_id,
        ack.code,
        ",".join(ack.error_codes) or "-",
        kind,
    )
    raise Hl7AckError(
        f"HL7 message {control_id} not accepted: MSA-1 {ack.code}"
        + (f", error codes {','.join(ack.error_codes)}" if ack.error_codes else "")
        + f" ({kind})",
        ack_code=ack.code,
        error_codes=ack.error_codes,
        transient=transient,
        detail=ack.text,
    )
