"""Final reports read back from DICOM SR, Encapsulated PDF and HL7 v2 ORU^R01.

Everything is built with the real libraries: SRs with highdicom (a TID 2000 report the way a
reporting system writes it, and the node's own draft from :mod:`integration.sr`), PDFs with
reportlab (a plain report, and the node's draft from :mod:`integration.report_pdf`) wrapped
by :mod:`integration.encapsulated_pdf`, ORU^R01 messages with hl7apy (or written out where
hl7apy would re-escape the formatting sequences under test). DICOM objects are written to
disk and read back before they are parsed.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen.canvas import Canvas

from integration.encapsulated_pdf import build_encapsulated_pdf
from integration.final_report import (
    FinalReport,
    FinalReportError,
    final_report_from_dataset,
    final_report_from_oru,
    is_report_object,
)
from integration.hl7_fields import unescape
from integration.report_pdf import DraftReportContent, render_report_pdf
from integration.report_sections import split_sections
from tests.helpers import node_draft_pdf, node_draft_sr
from tests.reporting.conftest import (
    ACCESSION,
    FILLER,
    FINDINGS,
    GENERATED,
    IMPRESSION,
    MODEL,
    PATIENT_NAME,
    VERSION,
)
from tests.reporting.final_builders import (
    FINAL_FINDINGS,
    FINAL_IMPRESSION,
    STUDY_UID,
    final_sr,
    oru,
)

SIGNED = dt.datetime(2024, 5, 7, 7, 30, tzinfo=dt.UTC)  # 09:30 at +0200
PRIVATE = ("Müller", "Jürgen", "PAT-123", "19510314", "lungs", ACCESSION)


def _stored(ds: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _no_private_data(text: str) -> None:
    for value in PRIVATE:
        assert value not in text


# --- SR --------------------------------------------------------------------------------------


def test_verified_sr(source: Dataset, tmp_path: Path) -> None:
    sr = _stored(final_sr(source), tmp_path)
    assert is_report_object(sr)
    report = final_report_from_dataset(sr, trusted_source=False)
    assert report == FinalReport(
        source="dicom-sr",
        study_uid=str(source.StudyInstanceUID),
        accession_number=ACCESSION,
        text=(f"FINDINGS: {FINAL_FINDINGS}\nPneumothorax absent\nIMPRESSION: {FINAL_IMPRESSION}"),
        findings=f"{FINAL_FINDINGS}\nPneumothorax absent",
        impression=FINAL_IMPRESSION,
        verified=True,
        signed_at=SIGNED,  # Verification DateTime read at Timezone Offset From UTC +0200
        object_uid=str(sr.SOPInstanceUID),
    )
    assert "Rita" not in report.text  # observer context is not report text
    _no_private_data(repr(report))


def test_latest_verification_with_its_own_offset(source: Dataset) -> None:
    sr = final_sr(source)
    later = copy.deepcopy(sr.VerifyingObserverSequence[0])
    later.VerificationDateTime = "20240508120000-0500"  # an addendum signed later
    sr.VerifyingObserverSequence.append(later)
    report = final_report_from_dataset(sr, trusted_source=False)
    assert report is not None
    assert report.signed_at == dt.datetime(2024, 5, 8, 17, 0, tzinfo=dt.UTC)


def test_unverified_sr(source: Dataset, tmp_path: Path) -> None:
    sr = _stored(final_sr(source, verified=False), tmp_path)
    assert sr.VerificationFlag == "UNVERIFIED"
    assert final_report_from_dataset(sr, trusted_source=False) is None
    report = final_report_from_dataset(sr, trusted_source=True)
    assert report is not None
    assert report.verified is False
    assert report.signed_at == dt.datetime(2024, 5, 7, 7, 15, tzinfo=dt.UTC)  # Content Date/Time


def _draft_sr(source: Dataset, kind: Literal["comprehensive", "basic"]) -> Dataset:
    return node_draft_sr(
        source,
        findings=FINDINGS,
        impression=IMPRESSION,
        model=MODEL,
        version=VERSION,
        software_version="0.1.0",
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        series_number=9901,
        kind=kind,
        created_at=GENERATED,
    )


@pytest.mark.parametrize("kind", ["comprehensive", "basic"])
def test_the_nodes_own_draft_sr_is_not_a_final_report(
    source: Dataset, tmp_path: Path, kind: Literal["comprehensive", "basic"]
) -> None:
    draft = _stored(_draft_sr(source, kind), tmp_path)
    assert is_report_object(draft)
    for trusted in (False, True):
        assert final_report_from_dataset(draft, trusted_source=trusted) is None
    # relabelled and flagged VERIFIED by some system on the way: the tree still says so
    draft.SeriesDescription = "Chest report"
    draft.VerificationFlag = "VERIFIED"
    assert final_report_from_dataset(draft, trusted_source=True) is None


def test_sr_without_study_uid_raises(source: Dataset) -> None:
    sr = final_sr(source)
    del sr.StudyInstanceUID
    with pytest.raises(FinalReportError, match="Study Instance UID") as caught:
        final_report_from_dataset(sr, trusted_source=False)
    assert str(sr.SOPInstanceUID) in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert caught.value.err_code == "207"
    _no_private_data(str(caught.value))


def test_sr_without_text_raises(source: Dataset) -> None:
    sr = final_sr(source)
    sr.ContentSequence = [item for item in sr.ContentSequence if item.ValueType != "CONTAINER"]
    with pytest.raises(FinalReportError, match="no TEXT items"):
        final_report_from_dataset(sr, trusted_source=False)


def test_not_a_report_object(source: Dataset) -> None:
    assert not is_report_object(source)
    assert final_report_from_dataset(source, trusted_source=True) is None


# --- Encapsulated PDF --------------------------------------------------------------------


def _encapsulate(source: Dataset, pdf: bytes, **overrides: str) -> Dataset:
    ds = build_encapsulated_pdf(
        pdf,
        source=source,
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        series_number=3,
        created_at=SIGNED,
        algorithm_name=MODEL,
        algorithm_version=VERSION,
        demo=False,
        manufacturer="Reporting Vendor",
        software_version="7.1",
        document_title="Radiology report",
    )
    # as a RIS writes it: its own series, no AI contributor, no verification flag
    ds.SeriesDescription = "Radiology reports"
    del ds.ContributingEquipmentSequence
    del ds.VerificationFlag
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


def _report_pdf(lines: list[str]) -> bytes:
    out = io.BytesIO()
    canvas = Canvas(out, pagesize=A4)
    y = 800
    for line in lines:
        canvas.drawString(72, y, line)
        y -= 16
    canvas.showPage()
    canvas.save()
    return out.getvalue()


REPORT_LINES = [
    "CHEST X-RAY PA",
    "FINDINGS:",
    FINAL_FINDINGS,
    "Heart size is normal.",
    "IMPRESSION:",
    FINAL_IMPRESSION,
]


def test_trusted_pdf(source: Dataset, tmp_path: Path) -> None:
    ds = _stored(_encapsulate(source, _report_pdf(REPORT_LINES)), tmp_path)
    assert len(ds.EncapsulatedDocument) % 2 == 0  # padded: the pad byte is cut again
    assert is_report_object(ds)
    assert final_report_from_dataset(ds, trusted_source=False) is None
    report = final_report_from_dataset(ds, trusted_source=True)
    assert report is not None
    assert report.source == "dicom-pdf"
    assert report.verified is True
    assert report.study_uid == str(source.StudyInstanceUID)
    assert report.accession_number == ACCESSION
    assert report.findings == f"{FINAL_FINDINGS}\nHeart size is normal."
    assert report.impression == FINAL_IMPRESSION
    assert report.text.startswith("CHEST X-RAY PA")
    assert report.signed_at == SIGNED  # Content Date/Time
    assert report.object_uid == str(ds.SOPInstanceUID)


def test_trusted_pdf_flagged_unverified(source: Dataset) -> None:
    ds = _encapsulate(source, _report_pdf(REPORT_LINES), VerificationFlag="UNVERIFIED")
    report = final_report_from_dataset(ds, trusted_source=True)
    assert report is not None
    assert report.verified is False


def test_the_nodes_own_draft_pdf_is_not_a_final_report(
    source: Dataset, content: DraftReportContent, tmp_path: Path
) -> None:
    pdf = render_report_pdf(content)
    ds = node_draft_pdf(
        pdf,
        source,
        model=MODEL,
        version=VERSION,
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        created_at=GENERATED,
    )
    ds = _stored(ds, tmp_path)
    for trusted in (False, True):
        assert final_report_from_dataset(ds, trusted_source=trusted) is None
    # the headers rewritten by a PACS: the PDF's banner still marks the draft
    relabelled = _encapsulate(source, pdf)
    assert final_report_from_dataset(relabelled, trusted_source=True) is None


def test_broken_pdf_raises(source: Dataset) -> None:
    broken = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage\n"
    ds = _encapsulate(source, _report_pdf(REPORT_LINES))
    ds.EncapsulatedDocument = broken
    ds.EncapsulatedDocumentLength = len(broken)
    with pytest.raises(FinalReportError, match=str(ds.SOPInstanceUID)):
        final_report_from_dataset(ds, trusted_source=True)


def test_pdf_without_text_raises(source: Dataset) -> None:
    ds = _encapsulate(source, _report_pdf([]))
    with pytest.raises(FinalReportError, match="no extractable text"):
        final_report_from_dataset(ds, trusted_source=True)


def test_pdf_without_study_uid_raises(source: Dataset) -> None:
    ds = _encapsulate(source, _report_pdf(REPORT_LINES))
    del ds.StudyInstanceUID
    with pytest.raises(FinalReportError, match=r"Study Instance UID \(0020,000D\)"):
        final_report_from_dataset(ds, trusted_source=True)


# --- HL7 v2 ORU^R01 ------------------------------------------------------------------------


def test_oru_with_zds() -> None:
    report = final_report_from_oru(oru())
    assert report == FinalReport(
        source="hl7",
        study_uid=STUDY_UID,
        accession_number=ACCESSION,
        text=f"{FINAL_FINDINGS}\nHeart size is normal.\n{FINAL_IMPRESSION}",
        findings=f"{FINAL_FINDINGS}\nHeart size is normal.",
        impression=FINAL_IMPRESSION,
        verified=True,
        signed_at=SIGNED,  # OBR-22
        object_uid="RIS|RADIOLOGY|RIS-0001",  # MSH-3|MSH-4|MSH-10
    )


def test_oru_with_accession_only_lf_separators_and_corrected_status() -> None:
    message = oru(zds=False, status="C").replace("\r", "\n")
    report = final_report_from_oru(message)
    assert report.study_uid is None
    assert report.accession_number == ACCESSION
    assert report.verified is True


def test_oru_study_uid_from_obx_and_filler_order_number() -> None:
    observations = [
        ("RP", "113014^DICOM Study^DCM", f"{STUDY_UID}^RIS^Application^DICOM"),
        ("TX", "GDT^Report^L", f"FINDINGS: {FINAL_FINDINGS}"),
        ("TX", "GDT^Report^L", f"IMPRESSION: {FINAL_IMPRESSION}"),
    ]
    report = final_report_from_oru(oru(zds=False, accession="", observations=observations))
    assert report.study_uid == STUDY_UID
    assert report.accession_number == FILLER  # OBR-3
    assert STUDY_UID not in report.text
    assert report.findings == FINAL_FINDINGS  # from the text's headings
    assert report.impression == FINAL_IMPRESSION


def test_oru_formatted_text_and_times_without_offset() -> None:
    """FT with escapes and formatting, repetitions, OBX-14 without offset (read as UTC)."""
    message = "\r".join(
        [
            "MSH|^~\\&|RIS|RAD|CXR-NODE|NODE|20240507093100||ORU^R01|RIS-7|P|2.3",
            "PID|1||PAT-123||Müller^Jürgen||19510314",
            f"OBR|1||{FILLER}|^CXR||||||||||||||{ACCESSION}||||||RAD|F",
            "OBX|1|FT|GDT^Report^L||FINDINGS:\\.br\\Lungs clear \\T\\ expanded, "
            "pleura \\F\\ normal.\\.br\\\\H\\IMPRESSION:\\N\\ Normal\\X2E\\~Second line"
            "||||||F|||20240507073000",
            "OBX|2|TX|GDT^Report^L||Retracted line||||||W",
            "",
        ]
    )
    report = final_report_from_oru(message)
    assert report.text == (
        "FINDINGS:\nLungs clear & expanded, pleura | normal.\nIMPRESSION: Normal.\nSecond line"
    )
    assert report.findings == "Lungs clear & expanded, pleura | normal."
    assert report.impression == "Normal.\nSecond line"
    assert report.signed_at == SIGNED
    assert report.study_uid is None


def test_times_out_of_range_are_unknown_not_an_error(source: Dataset, tmp_path: Path) -> None:
    """A time UTC cannot hold (year 9999 west of Greenwich, year 1 east of it) cannot be
    read: it gives no time, not an error, and the next time in line is used."""
    report = final_report_from_oru(oru(report_time="99991231235959-0500"))  # OBR-22
    assert report.signed_at == dt.datetime(2024, 5, 7, 7, 31, tzinfo=dt.UTC)  # MSH-7
    sr = final_sr(source)  # Timezone Offset From UTC +0200
    sr.VerifyingObserverSequence[0].VerificationDateTime = "00010101000000"
    report = final_report_from_dataset(_stored(sr, tmp_path), trusted_source=False)
    assert report is not None
    assert report.signed_at == dt.datetime(2024, 5, 7, 7, 15, tzinfo=dt.UTC)  # Content Date/Time


@pytest.mark.parametrize(
    ("message", "code", "match"),
    [
        (lambda: oru(status="P"), "103", "OBR-25 result status 'P'"),
        (lambda: oru(status="R"), "103", "OBR-25 result status 'R'"),
        (lambda: oru(message_type="ORU^R30^ORU_R30"), "201", "not ORU\\^R01"),
        (lambda: oru(message_type="ADT^A01^ADT_A01"), "200", "not ORU\\^R01"),
        (lambda: oru().replace("|RIS-0001|P|", "|RIS-0001|T|"), "202", "MSH-11"),
        (lambda: oru(observations=[]), "101", "no TX/FT/ST OBX text"),
        (lambda: oru(zds=False, accession="").replace(FILLER, ""), "101", "neither"),
        (lambda: oru().replace("RIS-0001", ""), "101", "MSH-10"),
        (lambda: oru().split("\rOBR")[0], "101", "no OBR"),
        (lambda: "this is not HL7", "100", "no MSH segment"),
        (lambda: "MSH|^^|garbage", "100", "hl7apy can parse"),
    ],
)
def test_oru_refused(message: Callable[[], str], code: str, match: str) -> None:
    with pytest.raises(FinalReportError, match=match) as caught:
        final_report_from_oru(message())
    assert caught.value.err_code == code
    _no_private_data(str(caught.value))


def test_adt_refused() -> None:
    msg = Message("ADT_A01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    msg.msh.msh_3, msg.msh.msh_9, msg.msh.msh_10 = "RIS", "ADT^A01^ADT_A01", "ADT-1"
    msg.msh.msh_11, msg.msh.msh_12 = "P", "2.5.1"
    msg.pid.pid_3, msg.pid.pid_5 = "PAT-123", PATIENT_NAME
    with pytest.raises(FinalReportError, match="not ORU") as caught:
        final_report_from_oru(str(msg.to_er7()))
    assert caught.value.err_code == "200"


def test_helpers() -> None:
    assert unescape("a\\S\\b\\E\\c\\.sp2\\d\\Zlocal\\e") == "a^b\\c\n\nde"
    assert split_sections("History: cough\nImpressions\nclear\n") == (None, "clear")
    assert split_sections("Impression of the lungs: fine") == (None, None)
