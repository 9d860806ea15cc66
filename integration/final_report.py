"""The radiologist's final report, read back from DICOM (SR, Encapsulated PDF) or HL7 v2.

The node scores its AI draft against the report a radiologist signed, which arrives as:

- a **DICOM SR** (Basic Text, Enhanced, Comprehensive, Comprehensive 3D SR; PS3.3 A.35),
  usually a TID 2000 report (PS3.16): final when its Verification Flag (0040,A493) is
  ``VERIFIED`` (PS3.3 C.17.2); signed at the latest Verification DateTime (0040,A030) of
  the Verifying Observer Sequence (0040,A073), else at Content Date/Time.
- a **DICOM Encapsulated PDF** (PS3.3 A.45.1): it says nothing reliable about who signed
  it, so it counts only from a source the caller trusts; a trusted PDF flagged
  ``UNVERIFIED`` is returned with ``verified=False``.
- an **HL7 v2 ORU^R01** (v2.5.1 chapter 7): final when OBR-25 (table 0123) is ``F`` or
  ``C`` (corrected final). Study Instance UID from IHE Radiology's ZDS-1 or an OBX coded
  ``113014^DICOM Study^DCM``; text from the TX/FT/ST OBX, escapes (section 2.7) undone.

Sections: FINDINGS are headings/items coded (121070, DCM) "Findings", (121071, DCM)
"Finding" or LOINC 59776-5; IMPRESSION (121072, DCM), (121073, DCM) or LOINC 19005-8
(CID 7001/7002); else ``FINDINGS:`` / ``IMPRESSION:`` line headings of the text.

The node's own drafts can come back (some PACS route a study's objects to every node); an
object with the marks :mod:`integration.sr`, :mod:`integration.encapsulated_pdf` and
:mod:`integration.report_pdf` write is never a final report, whatever its flags say: a
Series Description, Document Title or title concept containing ``AI DRAFT`` or
``UNVERIFIED AI`` (any case) or equal to the draft PDF's title; an SR TEXT item starting
with the draft notice or holding those marks in capitals; a PDF showing the draft banner.

Times are timezone-aware UTC. A DICOM DT without offset is read in the object's Timezone
Offset From UTC (0008,0201, PS3.3 C.12.1.1.8) when present, else as UTC; an HL7 TS without
offset as UTC. A time that cannot be read gives ``signed_at=None``, not an error.

Privacy: exception messages name UIDs, attributes, segments, fields and codes only; the
``repr`` of :class:`FinalReport` leaves out the accession number and the texts.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)
from pydicom.valuerep import DT
from pypdf import PdfReader

from integration.encapsulated_pdf import DOCUMENT_TITLE, ENCAPSULATED_PDF_STORAGE, extract_pdf
from integration.errors import EncapsulatedPdfError, IntegrationError
from integration.header_values import header_text, utc_offset
from integration.report_pdf import BANNER_TITLE
from integration.sr import AI_DRAFT_NOTE

__all__ = [
    "SR_STORAGE_CLASSES",
    "FinalReport",
    "FinalReportError",
    "final_report_from_dataset",
    "final_report_from_oru",
    "is_report_object",
    "split_sections",
    "unescape",
]

SR_STORAGE_CLASSES = frozenset(
    {BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage}
)
"""SR Storage SOP Classes read as reports (PS3.4 B.5; PS3.3 A.35.1-A.35.3, A.35.13)."""
SOURCES = frozenset({"dicom-sr", "dicom-pdf", "hl7"})
FINDINGS_CODES = frozenset({("121070", "DCM"), ("121071", "DCM"), ("59776-5", "LN")})
IMPRESSION_CODES = frozenset({("121072", "DCM"), ("121073", "DCM"), ("19005-8", "LN")})
STUDY_CODE = ("113014", "DCM")  # "DICOM Study" (CID 7001 / IHE RAD): OBX carrying the UID
FINAL_RESULT_STATUSES = frozenset({"F", "C"})  # HL7 table 0123: final, corrected final
_MARKERS = ("AI DRAFT", "UNVERIFIED AI")
_DRAFT_NOTE_START = AI_DRAFT_NOTE.split("{", 1)[0].strip()
_CONTEXT_RELATIONSHIPS = frozenset({"HAS OBS CONTEXT", "HAS CONCEPT MOD", "HAS ACQ CONTEXT"})
_TEXT_VALUE_TYPES = frozenset({"TX", "FT", "ST"})  # HL7 table 0125
_DATETIME = re.compile(r"\d{4}(\d{2}){0,5}(\.\d{1,6})?([+-]\d{4})?")  # DT, HL7 DTM
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_HEADING = re.compile(
    r"^\s*(?P<name>findings|impressions?|conclusions?|history|clinical history|indications?"
    r"|technique|comparison|recommendations?|procedure)\s*(?::\s*(?P<rest>.*)|$)",
    re.IGNORECASE,
)


class FinalReportError(IntegrationError, ValueError):
    """A final report object or message that cannot be used (``str()`` says why, no PHI).

    Parameters
    ----------
    message
        What is wrong: names a UID, attribute, segment or field, or a code.
    err_code
        The HL7 table 0357 code an acknowledgment would carry (ERR-3, as in
        :class:`integration.mllp_listener.Hl7Refusal`): ``"100"`` not parseable, ``"200"``
        not ORU^R01 (refuse with MSA-1 ``AR``), ``"103"`` OBR-25 not F/C, ``"101"`` a
        required field or segment missing; ``"207"`` (the default) for DICOM input.
    """

    def __init__(self, message: str, *, err_code: str = "207") -> None:
        super().__init__(message)
        self.err_code = err_code


@dataclass(frozen=True)
class FinalReport:
    """One final (radiologist-signed) report; see the module text for each source.

    ``source`` is ``"dicom-sr"``, ``"dicom-pdf"`` or ``"hl7"``; ``study_uid`` the Study
    Instance UID (0020,000D) or ``None`` (HL7 without one); ``accession_number`` (0008,0050)
    or OBR-18, else OBR-3; ``text`` the whole text, never empty (SR: ``"FINDINGS: ...\\n
    IMPRESSION: ..."``, PDF and HL7 as written); ``findings`` / ``impression`` the sections
    when they can be told apart; ``verified`` per the module text; ``signed_at`` aware UTC
    or ``None``; ``object_uid`` the SOP Instance UID or MSH-10.
    """

    source: str
    study_uid: str | None
    accession_number: str | None = field(repr=False)
    text: str = field(repr=False)
    findings: str | None = field(repr=False)
    impression: str | None = field(repr=False)
    verified: bool
    signed_at: dt.datetime | None
    object_uid: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {sorted(SOURCES)}")
        if not self.text.strip():
            raise ValueError("text must not be empty")


# --- DICOM -----------------------------------------------------------------------------------


def is_report_object(ds: Dataset) -> bool:
    """Whether ``ds`` is an SR (:data:`SR_STORAGE_CLASSES`) or Encapsulated PDF Storage."""
    sop_class = header_text(ds, "SOPClassUID")
    return sop_class in SR_STORAGE_CLASSES or sop_class == ENCAPSULATED_PDF_STORAGE


def final_report_from_dataset(ds: Dataset, *, trusted_source: bool) -> FinalReport | None:
    """Read a final report from an SR or Encapsulated PDF instance.

    Parameters
    ----------
    ds
        The instance as received (C-STORE, STOW-RS, file).
    trusted_source
        Whether the sender sends only radiologist-signed reports (e.g. the RIS's AE
        title): an UNVERIFIED SR or any PDF counts only then.

    Returns
    -------
    FinalReport or None
        ``None`` for a non-report object (:func:`is_report_object`), one that is not final
        (SR Verification Flag (0040,A493, PS3.3 C.17.2) not ``VERIFIED``, or a PDF, unless
        ``trusted_source``), or one with the node's AI draft marks (module text).

    Raises
    ------
    FinalReportError
        A final report object without Study Instance UID (0020,000D) or SOP Instance UID,
        with an empty content tree / no extractable PDF text, or with a broken PDF.
    """
    if not is_report_object(ds):
        return None
    is_pdf = header_text(ds, "SOPClassUID") == ENCAPSULATED_PDF_STORAGE
    flag = header_text(ds, "VerificationFlag").upper()
    if (not trusted_source and (is_pdf or flag != "VERIFIED")) or _marked_as_draft(ds):
        return None
    object_uid = header_text(ds, "SOPInstanceUID")
    if not object_uid:
        raise FinalReportError("report object without SOP Instance UID (0008,0018)")
    study_uid = header_text(ds, "StudyInstanceUID")
    if not study_uid:
        raise FinalReportError(f"{object_uid}: Study Instance UID (0020,000D) is missing")
    if is_pdf:
        text = _pdf_text(ds, object_uid)
        if text is None:
            return None
        findings, impression = split_sections(text)
    else:
        sections = _sr_sections(ds)
        if not sections:
            raise FinalReportError(f"{object_uid}: the SR content tree has no TEXT items")
        if any(_draft_text(line) for _, _, lines in sections for line in lines):
            return None
        text, findings, impression = _join_sections(sections)
    return FinalReport(
        source="dicom-pdf" if is_pdf else "dicom-sr",
        study_uid=study_uid,
        accession_number=header_text(ds, "AccessionNumber") or None,
        text=text,
        findings=findings,
        impression=impression,
        verified=flag != "UNVERIFIED" if is_pdf else flag == "VERIFIED",
        signed_at=_dicom_signed_at(ds),
        object_uid=object_uid,
    )


def _marked_as_draft(ds: Dataset) -> bool:
    """Series Description, Document Title or title concept with the node's draft marks."""
    concept = (ds.get("ConceptNameCodeSequence") or [Dataset()])[0]
    labels = [
        header_text(ds, "SeriesDescription"),
        header_text(ds, "DocumentTitle"),
        header_text(concept, "CodeMeaning"),
    ]
    if header_text(ds, "DocumentTitle") == DOCUMENT_TITLE:
        return True
    return any(marker in label.upper() for label in labels for marker in _MARKERS)


def _draft_text(text: str) -> bool:
    return text.startswith(_DRAFT_NOTE_START) or any(marker in text for marker in _MARKERS)


def _pdf_text(ds: Dataset, object_uid: str) -> str | None:
    """The PDF's text (pypdf), ``None`` for the node's draft PDF; raises FinalReportError."""
    try:
        pdf = extract_pdf(ds)  # checks the MIME type, cuts the 0x00 pad byte
    except EncapsulatedPdfError as exc:
        raise FinalReportError(f"{object_uid}: {exc.message}") from None
    try:
        reader = PdfReader(io.BytesIO(pdf))
        pages = [page.extract_text() or "" for page in reader.pages]
        title = str(reader.metadata.title or "") if reader.metadata else ""
    except Exception as exc:  # pypdf raises many types for broken files
        raise FinalReportError(
            f"{object_uid}: Encapsulated Document (0042,0011) is not a readable PDF "
            f"({type(exc).__name__})"
        ) from None
    text = "\n".join(page.strip() for page in pages if page.strip())
    if BANNER_TITLE in " ".join(text.split()) or title == DOCUMENT_TITLE:
        return None
    if not text:
        raise FinalReportError(f"{object_uid}: the encapsulated PDF has no extractable text")
    return text


_Section = tuple[str | None, str | None, list[str]]  # (heading label, kind, lines)


def _sr_sections(ds: Dataset) -> list[_Section]:
    """TEXT (and finding CODE) values of the content tree by heading, in document order."""
    root: _Section = (None, None, [])
    sections: list[_Section] = [root]
    _walk(ds.get("ContentSequence") or [], root, sections)
    return [section for section in sections if section[2]]


def _walk(items: Iterable[Dataset], heading: _Section, sections: list[_Section]) -> None:
    """Depth-first walk (PS3.3 C.17.3): CONTAINERs open a section, context items are skipped."""
    for item in items:
        if header_text(item, "RelationshipType").upper() in _CONTEXT_RELATIONSHIPS:
            continue
        value_type = header_text(item, "ValueType").upper()
        name = (item.get("ConceptNameCodeSequence") or [Dataset()])[0]
        kind = _kind(header_text(name, "CodeValue"), header_text(name, "CodingSchemeDesignator"))
        children = item.get("ContentSequence") or []
        if value_type == "CONTAINER":
            label = header_text(name, "CodeMeaning") or None
            section: _Section = (label, kind or heading[1], [])
            sections.append(section)
            _walk(children, section, sections)
            continue
        value = ""
        if value_type == "TEXT":
            value = header_text(item, "TextValue")
        elif value_type == "CODE" and (kind or heading[1]) == "findings":
            value = header_text((item.get("ConceptCodeSequence") or [Dataset()])[0], "CodeMeaning")
        if value:
            target = heading
            if kind and heading[1] is None:  # e.g. an Impression TEXT right under the root
                if sections[-1][:2] != (None, kind):
                    sections.append((None, kind, []))
                target = sections[-1]
            target[2].append(value)
        _walk(children, heading, sections)


def _kind(code: str, scheme: str) -> str | None:
    """``"findings"``, ``"impression"`` or ``None`` for a coded concept (CID 7001/7002)."""
    key = (code, "LN" if scheme.upper() == "LOINC" else scheme.upper())
    return (
        "findings" if key in FINDINGS_CODES else "impression" if key in IMPRESSION_CODES else None
    )


def _join_sections(sections: list[_Section]) -> tuple[str, str | None, str | None]:
    """(whole text ``"FINDINGS: ...\\nIMPRESSION: ..."``, findings, impression)."""
    parts: list[str] = []
    found: dict[str, list[str]] = {"findings": [], "impression": []}
    for label, kind, lines in sections:
        body = "\n".join(lines)
        heading = kind.upper() if kind else (label or "").upper()
        parts.append(f"{heading}: {body}" if heading else body)
        if kind:
            found[kind].append(body)
    return (
        "\n".join(parts),
        "\n".join(found["findings"]) or None,
        "\n".join(found["impression"]) or None,
    )


def _dicom_signed_at(ds: Dataset) -> dt.datetime | None:
    """Latest Verification DateTime of the Verifying Observer Sequence, else Content Date/Time."""
    text = utc_offset(ds)  # Timezone Offset From UTC: "+HHMM", "-HHMM" or ""
    offset = dt.datetime.strptime(text, "%z").tzinfo if text else None
    observers = ds.get("VerifyingObserverSequence") or []
    times = [_dicom_datetime(header_text(o, "VerificationDateTime"), offset) for o in observers]
    if any(times):
        return max(t for t in times if t is not None)
    date, time = header_text(ds, "ContentDate"), header_text(ds, "ContentTime")
    return _dicom_datetime(date + (time or ""), offset) if date else None


def _dicom_datetime(value: str, offset: dt.tzinfo | None) -> dt.datetime | None:
    """A DICOM DT (DA + TM) value in UTC; without its own offset, at ``offset`` (or UTC)."""
    if not _DATETIME.fullmatch(value):  # pydicom would read "2024-05-07" as 2024-01-01
        return None
    try:
        parsed: dt.datetime = DT(value)
    except (ValueError, TypeError):
        return None
    when = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=offset or dt.UTC)
    return when.astimezone(dt.UTC)


def split_sections(text: str) -> tuple[str | None, str | None]:
    """(FINDINGS, IMPRESSION) of a plain text by its line headings, ``None`` when absent.

    A heading is ``NAME:`` at the start of a line (text may follow) or a line that is only
    ``NAME``; a section runs to the next heading (history, technique, ... end it too).
    """
    found: dict[str, list[str]] = {"findings": [], "impression": []}
    current: str | None = None
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            name = match.group("name").lower()
            current = "impression" if name.startswith("impression") else None
            current = "findings" if name == "findings" else current
            line = match.group("rest") or ""
        if current is not None and line.strip():
            found[current].append(line.strip())
    return "\n".join(found["findings"]) or None, "\n".join(found["impression"]) or None


# --- HL7 v2 ----------------------------------------------------------------------------------


def final_report_from_oru(er7: str) -> FinalReport:
    """Read a final report from an HL7 v2 ORU^R01 (v2.5.1 chapter 7; other v2.x read alike).

    Parameters
    ----------
    er7
        The message as received, MLLP framing removed; segments end with CR, LF or CRLF.

    Returns
    -------
    FinalReport
        ``source="hl7"``, ``verified=True``; sections by OBX-3 code, else by text heading.

    Raises
    ------
    FinalReportError
        With :attr:`FinalReportError.err_code`: not parseable by hl7apy (100); MSH-9
        not ``ORU^R01`` (200); no OBR or MSH-10 (101); OBR-25 not ``F``/``C`` (103); no
        TX/FT/ST OBX text (101); neither Study Instance UID nor accession number (101).
    """
    segments = _parse(er7)
    msh, control_id, obr = _final_order(segments)
    lines = _oru_text(segments)
    if not lines:
        raise FinalReportError(f"{control_id}: no TX/FT/ST OBX text", err_code="101")
    text = "\n".join(line for _, line in lines)
    by_heading = dict(zip(("findings", "impression"), split_sections(text), strict=True))
    coded = {k: "\n".join(t for kind, t in lines if kind == k).strip() for k in by_heading}
    findings = coded["findings"] or by_heading["findings"]  # OBX-3 code, else text heading
    impression = coded["impression"] or by_heading["impression"]
    study_uid = _study_uid(segments)
    accession = obr.components(18)[0] or obr.components(3)[0] or None
    if study_uid is None and accession is None:
        raise FinalReportError(
            f"{control_id}: neither Study Instance UID (ZDS-1, OBX 113014) nor accession "
            "number (OBR-18, OBR-3)",
            err_code="101",
        )
    return FinalReport(
        source="hl7",
        study_uid=study_uid,
        accession_number=accession,
        text=text,
        findings=findings,
        impression=impression,
        verified=True,
        signed_at=_hl7_signed_at(msh, obr, segments),
        object_uid=control_id,
    )


def _parse(er7: str) -> list[_Segment]:
    """hl7apy's flat parse (Z segments kept), TOLERANT; CR, LF or CRLF segment ends."""
    text = re.sub(r"\r\n|\n|\r", "\r", er7.strip("\x0b\x1c\r\n \t"))
    if not text.startswith("MSH"):
        raise FinalReportError("not an HL7 v2 message: no MSH segment", err_code="100")
    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    except Exception as exc:  # hl7apy's exceptions quote the message: not chained
        raise FinalReportError(
            f"not an HL7 v2 message hl7apy can parse ({type(exc).__name__})",
            err_code="100",
        ) from None
    return [_Segment(segment, message) for segment in message.children]


def _final_order(segments: list[_Segment]) -> tuple[_Segment, str, _Segment]:
    """(MSH, MSH-10, first OBR) of an ORU^R01 whose OBR-25 is F or C; else raises."""
    msh = segments[0]
    kind = msh.components(9)
    if kind[:2] != ["ORU", "R01"] or (len(kind) > 2 and kind[2] not in ("", "ORU_R01")):
        raise FinalReportError(f"MSH-9 is {'^'.join(kind)[:20]!r}, not ORU^R01", err_code="200")
    control_id = msh.text(10)
    if not control_id:
        raise FinalReportError("MSH-10 (message control ID) is empty", err_code="101")
    obr = next((s for s in segments if s.name == "OBR"), None)
    if obr is None:
        raise FinalReportError(f"{control_id}: no OBR segment", err_code="101")
    status = obr.text(25).upper()
    if status not in FINAL_RESULT_STATUSES:
        raise FinalReportError(
            f"{control_id}: OBR-25 result status {status[:2]!r} is not F or C (table 0123)",
            err_code="103",
        )
    return msh, control_id, obr


class _Segment:
    """Raw field values of an hl7apy segment, as the sender escaped them."""

    def __init__(self, segment: object, message: Message) -> None:
        self.name = str(getattr(segment, "name", ""))
        chars = dict(message.encoding_chars)
        self.component = chars["COMPONENT"]
        self.escape = {k: chars[k] for k in ("FIELD", "COMPONENT", "SUBCOMPONENT", "REPETITION")}
        self.escape["ESCAPE"] = chars["ESCAPE"]
        # hl7apy re-escapes a lone escape character on to_er7 ("\.br\" -> "\E\.br\E\");
        # with an escape character that never occurs its output is the received text
        raw = {**chars, "ESCAPE": "\x00"}
        self.fields: dict[int, list[str]] = {}
        for child in getattr(segment, "children", []):
            number = str(child.name).rsplit("_", 1)[-1]
            if number.isdigit():
                self.fields.setdefault(int(number), []).append(child.to_er7(encoding_chars=raw))

    def repetitions(self, number: int) -> list[str]:
        """Every repetition of field ``number``, still escaped."""
        return self.fields.get(number, [])

    def components(self, number: int) -> list[str]:
        """The unescaped components of the first repetition (at least one, maybe ``""``)."""
        first = (self.repetitions(number) or [""])[0]
        return [unescape(c, self.escape).strip() for c in first.split(self.component)]

    def text(self, number: int) -> str:
        """The first component of field ``number``, unescaped."""
        return self.components(number)[0]


def unescape(value: str, chars: dict[str, str] | None = None) -> str:
    """Undo HL7 v2 escape sequences (v2.5.1 section 2.7) in a TX/FT/ST value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` give the delimiters, ``\\Xhh..\\`` the bytes (UTF-8,
    else Latin-1), ``\\.br\\``, ``\\.sp\\`` and ``\\.ce\\`` a line break; highlighting,
    character-set and other formatting sequences are dropped.
    """
    chars = chars or {"FIELD": "|", "COMPONENT": "^", "SUBCOMPONENT": "&", "REPETITION": "~"}
    esc = chars.get("ESCAPE", "\\")
    names = {"F": "FIELD", "S": "COMPONENT", "T": "SUBCOMPONENT", "R": "REPETITION"}

    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        if body in names:
            return chars[names[body]]
        if body == "E":
            return esc
        if body.startswith((".br", ".sp", ".ce")):
            count = body[3:].strip().lstrip("+")
            return "\n" * (int(count) if body.startswith(".sp") and count.isdigit() else 1)
        if body.startswith("X") and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", body[1:]):
            data = bytes.fromhex(body[1:])
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return data.decode("latin-1")
        return ""  # \H\ \N\ \Cxxyy\ \Mxxyyzz\ \Zxxx\ and other formatting commands

    pattern = re.escape(esc) + "([^" + re.escape(esc) + "]*)" + re.escape(esc)
    return re.sub(pattern, replace, value)


def _oru_text(segments: list[_Segment]) -> list[tuple[str | None, str]]:
    """[(section kind by OBX-3, line)] of the TX/FT/ST OBX; OBX-5 repetitions are lines.

    The 113014 OBX (study UID) and OBX-11 ``W`` (wrong) / ``D`` (deleted, table 0085) are
    skipped.
    """
    lines: list[tuple[str | None, str]] = []
    for obx in (s for s in segments if s.name == "OBX"):
        code = [*obx.components(3), "", "", ""]
        if obx.text(2).upper() not in _TEXT_VALUE_TYPES or (code[0], code[2]) == STUDY_CODE:
            continue
        if obx.text(11).upper() in ("W", "D"):
            continue
        kind = _kind(code[0], code[2]) or _kind(code[3], code[5] if len(code) > 5 else "")
        for repetition in obx.repetitions(5):
            value = unescape(repetition, obx.escape).strip("\n")
            lines.extend((kind, line.rstrip()) for line in value.split("\n"))
    while lines and not lines[-1][1].strip():
        lines.pop()
    return lines


def _study_uid(segments: list[_Segment]) -> str | None:
    """ZDS-1 (RP, IHE RAD TF-2), else OBX-5 of an RP/ST/HD OBX coded 113014^DICOM Study^DCM."""
    candidates = [s.text(1) for s in segments if s.name == "ZDS"]
    for obx in (s for s in segments if s.name == "OBX"):
        code = [*obx.components(3), "", "", ""]
        if (code[0], code[2]) == STUDY_CODE and obx.text(2).upper() in ("RP", "ST", "HD"):
            candidates.append(obx.text(5))
    return next((uid for uid in candidates if len(uid) <= 64 and _UID.fullmatch(uid)), None)


def _hl7_signed_at(msh: _Segment, obr: _Segment, segments: list[_Segment]) -> dt.datetime | None:
    """OBR-22, else the first OBX-14, else MSH-7 (TS, first component), in UTC."""
    values = [obr.text(22)]
    values += [s.text(14) for s in segments if s.name == "OBX" and s.text(14)][:1]
    values.append(msh.text(7))
    parsed = (_dicom_datetime(v, dt.UTC) for v in values)  # HL7 DTM is DICOM DT syntax
    return next((when for when in parsed if when is not None), None)
