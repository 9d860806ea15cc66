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
  ``C`` (corrected final), of a production message (MSH-11 ``P``, table 0103: a training
  or debugging message is no patient's report). Study Instance UID from IHE Radiology's
  ZDS-1 or an OBX coded ``113014^DICOM Study^DCM``; text from the TX/FT/ST OBX, escapes
  (section 2.7) undone. All of it is the first order's (OBR): a later order of the message
  (another exam, its own status) is not read.

Sections: FINDINGS are headings/items coded (121070, DCM) "Findings", (121071, DCM)
"Finding" or LOINC 59776-5; IMPRESSION (121072, DCM), (121073, DCM) or LOINC 19005-8
(CID 7001/7002); else ``FINDINGS:`` / ``IMPRESSION:`` line headings of the text
(:mod:`integration.report_sections`). The HL7 fields are read by
:mod:`integration.hl7_fields`, the times by :mod:`integration.dicom_times`.

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
import hashlib
import io
from dataclasses import dataclass, field

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)
from pypdf import PdfReader

from integration.dicom_times import dicom_signed_at
from integration.encapsulated_pdf import DOCUMENT_TITLE, ENCAPSULATED_PDF_STORAGE, extract_pdf
from integration.errors import EncapsulatedPdfError, IntegrationError
from integration.header_values import header_text
from integration.hl7_fields import (
    Hl7Segment,
    cr_segments,
    oru_signed_at,
    oru_study_uid,
    oru_text,
)
from integration.report_pdf import BANNER_TITLE
from integration.report_sections import join_sections, split_sections, sr_sections
from integration.sr import AI_DRAFT_NOTE

__all__ = [
    "SR_STORAGE_CLASSES",
    "FinalReport",
    "FinalReportError",
    "final_report_from_dataset",
    "final_report_from_oru",
    "is_report_object",
]

SR_STORAGE_CLASSES = frozenset(
    {BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage}
)
"""SR Storage SOP Classes read as reports (PS3.4 B.5; PS3.3 A.35.1-A.35.3, A.35.13)."""
SOURCES = frozenset({"dicom-sr", "dicom-pdf", "hl7"})
FINAL_RESULT_STATUSES = frozenset({"F", "C"})  # HL7 table 0123: final, corrected final
PRODUCTION = "P"  # HL7 table 0103 (MSH-11): production; T training, D debugging
_MARKERS = ("AI DRAFT", "UNVERIFIED AI")
_DRAFT_NOTE_START = AI_DRAFT_NOTE.split("{", 1)[0].strip()


class FinalReportError(IntegrationError, ValueError):
    """A final report object or message that cannot be used (``str()`` says why, no PHI).

    Parameters
    ----------
    message
        What is wrong: names a UID, attribute, segment or field, or a code.
    err_code
        The HL7 table 0357 code an acknowledgment would carry (ERR-3, as in
        :class:`integration.mllp_listener.Hl7Refusal`): ``"100"`` not parseable, ``"200"``
        not ORU, ``"201"`` an ORU not R01 and ``"202"`` MSH-11 not ``P`` (refused:
        :attr:`ack_code` ``AR``), ``"103"`` OBR-25 not F/C, ``"101"`` a required field or
        segment missing; ``"207"`` (the default) for DICOM input.
    """

    #: ERR-3 codes of a message the receiver does not take at all (HL7 v2.5.1 2.9.2.1 a:
    #: message type, event, processing ID), answered MSA-1 ``AR``
    REJECTED = frozenset({"200", "201", "202"})

    def __init__(self, message: str, *, err_code: str = "207") -> None:
        super().__init__(message)
        self.err_code = err_code

    @property
    def ack_code(self) -> str:
        """MSA-1 of the acknowledgment (table 0008): ``AR`` for :data:`REJECTED` codes,
        else ``AE`` (the content is wrong)."""
        return "AR" if self.err_code in self.REJECTED else "AE"


@dataclass(frozen=True)
class FinalReport:
    """One final (radiologist-signed) report; see the module text for each source.

    ``source`` is ``"dicom-sr"``, ``"dicom-pdf"`` or ``"hl7"``; ``study_uid`` the Study
    Instance UID (0020,000D) or ``None`` (HL7 without one); ``accession_number`` (0008,0050)
    or OBR-18, else OBR-3; ``text`` the whole text, never empty (SR: ``"FINDINGS: ...\\n
    IMPRESSION: ..."``, PDF and HL7 as written); ``findings`` / ``impression`` the sections
    when they can be told apart; ``verified`` per the module text; ``signed_at`` aware UTC
    or ``None``; ``object_uid`` the SOP Instance UID, or ``MSH-3|MSH-4|MSH-10`` (a control
    ID names a message of its sending application and facility, not of every sender).
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
        sections = sr_sections(ds)
        if not sections:
            raise FinalReportError(f"{object_uid}: the SR content tree has no TEXT items")
        if any(_draft_text(line) for _, _, lines in sections for line in lines):
            return None
        text, findings, impression = join_sections(sections)
    return FinalReport(
        source="dicom-pdf" if is_pdf else "dicom-sr",
        study_uid=study_uid,
        # a NUL inside (pydicom strips trailing padding only) is no character of it
        accession_number=header_text(ds, "AccessionNumber").replace("\x00", "") or None,
        text=text,
        findings=findings,
        impression=impression,
        verified=flag != "UNVERIFIED" if is_pdf else flag == "VERIFIED",
        signed_at=dicom_signed_at(ds),
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
    # a NUL (a string shown with \\000, a font without a Unicode map) is no text
    pages = [page.replace("\x00", "") for page in pages]
    text = "\n".join(page.strip() for page in pages if page.strip())
    if BANNER_TITLE in " ".join(text.split()) or title == DOCUMENT_TITLE:
        return None
    if not text:
        raise FinalReportError(f"{object_uid}: the encapsulated PDF has no extractable text")
    return text


# --- HL7 v2 -----------------------------------------------------------------------------------


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
        not ``ORU^R01`` (200, or 201 for an ORU of another event); MSH-11 not ``P`` (202:
        a training or debugging message); no OBR or MSH-10 (101); OBR-25 not ``F``/``C``
        (103); no TX/FT/ST OBX text (101); neither Study Instance UID nor accession number
        (101).
    """
    segments = _parse(er7)
    msh, control_id, obr = _final_order(segments)
    segments = _first_order(segments, obr)
    lines = oru_text(segments)
    if not lines:
        raise FinalReportError(f"{control_id}: no TX/FT/ST OBX text", err_code="101")
    text = "\n".join(line for _, line in lines)
    by_heading = dict(zip(("findings", "impression"), split_sections(text), strict=True))
    coded = {k: "\n".join(t for kind, t in lines if kind == k).strip() for k in by_heading}
    findings = coded["findings"] or by_heading["findings"]  # OBX-3 code, else text heading
    impression = coded["impression"] or by_heading["impression"]
    study_uid = oru_study_uid(segments)
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
        signed_at=oru_signed_at(msh, obr, segments),
        object_uid=_message_key(msh, control_id),
    )


def _parse(er7: str) -> list[Hl7Segment]:
    """hl7apy's flat parse (Z segments kept), TOLERANT; CR, LF or CRLF segment ends."""
    text = cr_segments(er7.strip("\x0b\x1c\r\n \t"))
    if not text.startswith("MSH"):
        raise FinalReportError("not an HL7 v2 message: no MSH segment", err_code="100")
    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    except Exception as exc:  # hl7apy's exceptions quote the message: not chained
        raise FinalReportError(
            f"not an HL7 v2 message hl7apy can parse ({type(exc).__name__})",
            err_code="100",
        ) from None
    return [Hl7Segment(segment, message) for segment in message.children]


def _first_order(segments: list[Hl7Segment], obr: Hl7Segment) -> list[Hl7Segment]:
    """The segments before the second OBR: the first order's (ORDER_OBSERVATION group,
    v2.5.1 7.3.1), whose OBR-25, accession, ZDS and OBX make the report; a later order of
    the message (another exam, with its own status) is not its text."""
    later = [i for i, s in enumerate(segments) if s.name == "OBR" and s is not obr]
    return segments[: later[0]] if later else segments


def _message_key(msh: Hl7Segment, control_id: str) -> str:
    """``MSH-3|MSH-4|MSH-10``: what names one message (v2.5.1 2.14.9.10: the sending system
    assigns MSH-10; two systems may both count from 1). HD values to three components. A
    key over 200 characters (the stored key) is ``sha256:`` and its digest instead: cut
    short, two facilities' OIDs (HD-2) that differ only at the end would be one sender."""
    sender = ["^".join(msh.components(n)[:3]).rstrip("^") for n in (3, 4)]
    key = "|".join([*sender, control_id])
    if len(key) <= 200:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _final_order(segments: list[Hl7Segment]) -> tuple[Hl7Segment, str, Hl7Segment]:
    """(MSH, MSH-10, first OBR) of a production ORU^R01 whose OBR-25 is F or C; else raises."""
    msh = segments[0]
    kind = msh.components(9)
    if kind[:2] != ["ORU", "R01"] or (len(kind) > 2 and kind[2] not in ("", "ORU_R01")):
        # table 0357: 201 an ORU of another event (R30, R31...), 200 another message type
        code = "201" if kind[:1] == ["ORU"] else "200"
        raise FinalReportError(f"MSH-9 is {'^'.join(kind)[:20]!r}, not ORU^R01", err_code=code)
    processing = msh.text(11).upper()
    if processing not in ("", PRODUCTION):  # HL7 v2.5.1 2.9.2.1 a): rejected, MSA-1 AR
        raise FinalReportError(
            f"MSH-11 processing ID {processing[:2]!r} is not P (production, table 0103)",
            err_code="202",
        )
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
