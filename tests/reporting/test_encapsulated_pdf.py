"""Encapsulated PDF instance (integration.encapsulated_pdf): dciodvfy, pdftoppm, pypdf."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pypdf import PdfReader

from integration.encapsulated_pdf import (
    ENCAPSULATED_PDF_STORAGE,
    build_encapsulated_pdf,
    extract_pdf,
)
from integration.errors import EncapsulatedPdfError
from integration.report_pdf import (
    BANNER_TITLE,
    DEMO_PDF_NOTE,
    DraftReportContent,
    render_report_pdf,
    report_header_from,
)
from integration.uids import deterministic_uid
from tests.reporting.conftest import (
    ACCESSION,
    ACCESSION_OID,
    GENERATED,
    IMPRESSION,
    MODEL,
    PATIENT_NAME,
    VERSION,
    assert_not_blank_with_banner,
    dciodvfy_errors,
    render_png,
)


def build(source: Dataset, pdf: bytes, **kw: object) -> Dataset:
    study = str(source.get("StudyInstanceUID", "no study"))
    args: dict[str, object] = {
        "source": source,
        "sop_instance_uid": deterministic_uid("pdf-instance", study),
        "series_instance_uid": deterministic_uid("pdf-series", study),
        "series_number": 9902,
        "created_at": GENERATED,
        "algorithm_name": MODEL,
        "algorithm_version": VERSION,
        "demo": True,
        "manufacturer": "llm-cxr-node",
        "software_version": "0.1.0",
    }
    args.update(kw)
    return build_encapsulated_pdf(pdf, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pdf(content: DraftReportContent) -> bytes:
    return render_report_pdf(content)


def test_valid_instance_whose_pdf_renders(source: Dataset, pdf: bytes, tmp_path: Path) -> None:
    path = tmp_path / "report.dcm"
    build(source, pdf).save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_errors(path)
    assert errors == []
    assert warnings == []

    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert back.Modality == "DOC"
    assert back.ConversionType == "WSD"
    assert back.BurnedInAnnotation == "YES"
    assert back.VerificationFlag == "UNVERIFIED"
    assert back.SeriesDescription == "AI DRAFT UNVERIFIED - report PDF (DEMO)"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.AccessionNumber == ACCESSION
    assert back.IssuerOfAccessionNumberSequence[0].UniversalEntityID == ACCESSION_OID
    assert back.TimezoneOffsetFromUTC == "-0400"
    # generated 07:08:09 UTC = 03:08:09 in the study's time zone
    assert (back.ContentDate, back.ContentTime) == ("20240506", "030809")
    assert back.AcquisitionDateTime == "20240506030809-0400"
    concept = back.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == ("18748-4", "LN")
    source_ref = back.SourceInstanceSequence[0]
    assert source_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert source_ref.ReferencedSOPClassUID == source.SOPClassUID
    algorithm = back.ContributingEquipmentSequence[0]
    assert (algorithm.ManufacturerModelName, algorithm.SoftwareVersions) == (MODEL, VERSION)
    assert back.SoftwareVersions == "0.1.0"

    # the name was Latin-1 in the source; here it is UTF-8 under ISO_IR 192
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == PATIENT_NAME
    raw = path.read_bytes()
    assert "Müller".encode() in raw and "Müller".encode("latin-1") not in raw

    assert back.EncapsulatedDocumentLength == len(pdf)
    assert len(back.EncapsulatedDocument) % 2 == 0
    extracted = extract_pdf(back)
    assert extracted == pdf
    text = " ".join(PdfReader(io.BytesIO(extracted)).pages[0].extract_text().split())
    for expected in (BANNER_TITLE, VERSION, " ".join(DEMO_PDF_NOTE.split()), IMPRESSION, "Müller"):
        assert expected in text, expected
    pdf_path = tmp_path / "extracted.pdf"
    pdf_path.write_bytes(extracted)
    assert_not_blank_with_banner(render_png(pdf_path, tmp_path / "page"))


def test_odd_length_pdf_is_padded_and_comes_back_exact(source: Dataset, pdf: bytes) -> None:
    odd = pdf + (b"\n" if len(pdf) % 2 == 0 else b"")  # trailing whitespace: still a PDF
    assert len(odd) % 2 == 1
    ds = build(source, odd)
    assert ds.EncapsulatedDocument == odd + b"\x00"
    assert extract_pdf(ds) == odd
    del ds.EncapsulatedDocumentLength  # an instance from elsewhere may lack it
    assert extract_pdf(ds) == odd


def test_japanese_name_and_real_model(
    source: Dataset, content: DraftReportContent, tmp_path: Path
) -> None:
    utf8 = copy.deepcopy(source)
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.PatientName = "山田^太郎=やまだ^たろう"
    del utf8.TimezoneOffsetFromUTC
    src_path = tmp_path / "utf8.dcm"
    utf8.save_as(src_path, enforce_file_format=True)
    utf8 = pydicom.dcmread(src_path)
    rendered = render_report_pdf(
        dataclasses.replace(content, header=report_header_from(utf8), demo=False)
    )
    path = tmp_path / "utf8-report.dcm"
    build(utf8, rendered, demo=False).save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_errors(path)
    assert errors == [] and warnings == []
    back = pydicom.dcmread(path)
    assert str(back.PatientName) == "山田^太郎=やまだ^たろう"
    assert back.SeriesDescription == "AI DRAFT UNVERIFIED - report PDF"
    assert "TimezoneOffsetFromUTC" not in back
    local = GENERATED.astimezone()  # no offset: the host's local time, as the draft SR's
    assert (back.ContentDate, back.ContentTime) == (
        local.strftime("%Y%m%d"),
        local.strftime("%H%M%S"),
    )
    text = PdfReader(io.BytesIO(extract_pdf(back))).pages[0].extract_text()
    assert "cannot be shown with this PDF's font" in text  # CJK: documented fallback


def test_missing_type2_attributes_are_present_and_empty(pdf: bytes) -> None:
    bare = Dataset()
    bare.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    bare.SOPInstanceUID = deterministic_uid("bare-image")
    bare.SeriesInstanceUID = deterministic_uid("bare-series")
    bare.StudyInstanceUID = deterministic_uid("bare-study")
    ds = build(bare, pdf)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"):
        assert keyword in ds and ds[keyword].value in ("", None)


@pytest.mark.parametrize(
    ("pdf_bytes", "change", "message"),
    [
        (b"GIF89a", {}, "not a PDF"),
        (None, {"series_instance_uid": "SAME"}, "own series"),
        (None, {"sop_instance_uid": "1.2.3.x"}, "not a valid UID"),
        (None, {"created_at": dt.datetime(2024, 1, 1)}, "timezone-aware"),
        (None, {"algorithm_version": "v" * 65}, "VR LO"),
    ],
)
def test_invalid_inputs_are_refused(
    source: Dataset,
    pdf: bytes,
    pdf_bytes: bytes | None,
    change: dict[str, object],
    message: str,
) -> None:
    if change.get("series_instance_uid") == "SAME":
        change = {"series_instance_uid": source.SeriesInstanceUID}
    with pytest.raises(EncapsulatedPdfError, match=message):
        build(source, pdf_bytes or pdf, **change)


def test_source_without_study_uid_is_refused(source: Dataset, pdf: bytes) -> None:
    headless = copy.deepcopy(source)
    del headless.StudyInstanceUID
    with pytest.raises(EncapsulatedPdfError, match="StudyInstanceUID"):
        build(headless, pdf)


def test_extract_refuses_other_objects(source: Dataset) -> None:
    with pytest.raises(EncapsulatedPdfError, match="not an Encapsulated PDF"):
        extract_pdf(source)


@pytest.mark.parametrize("offset", ["+2400", "+0060", "-0400x"])
def test_an_offset_no_zone_can_be_made_of_is_not_copied(
    source: Dataset, pdf: bytes, offset: str
) -> None:
    """The PDF of an image whose Timezone Offset From UTC makes no zone is built, dated in
    the host's local time and without the offset (it would declare that zone for its own
    times and the copied Study Date/Time). Before, ``+2400`` raised ValueError and the
    others were copied over times not in them."""
    odd = copy.deepcopy(source)
    odd.TimezoneOffsetFromUTC = offset
    ds = build(odd, pdf)
    assert "TimezoneOffsetFromUTC" not in ds
    local = GENERATED.astimezone()
    assert (ds.ContentDate, ds.ContentTime) == (local.strftime("%Y%m%d"), local.strftime("%H%M%S"))
