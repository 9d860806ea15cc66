"""The draft report PDF (integration.report_pdf): text, layout, determinism, fonts.

Checked with real readers: pypdf extracts the text, poppler's pdftoppm rasterises the page.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pypdf import PdfReader

from integration.errors import ReportRenderError
from integration.report_pdf import (
    BANNER_TITLE,
    DEMO_PDF_NOTE,
    MAX_SECTION_CHARS,
    MAX_SECTION_LINES,
    DraftReportContent,
    ReportHeader,
    render_report_pdf,
    report_header_from,
)
from integration.report_text import unrenderable_characters
from tests.helpers import REPO
from tests.reporting.conftest import (
    ACCESSION,
    FINDINGS,
    GENERATED,
    IMPRESSION,
    VERSION,
    assert_not_blank_with_banner,
    render_png,
)


def pages_text(pdf: bytes) -> list[str]:
    return [page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages]


def flat(text: str) -> str:
    return " ".join(text.split())


def test_header_from_dicom(source: Dataset) -> None:
    header = report_header_from(source)
    assert header.patient_name == "Müller, Jürgen"  # decoded from ISO 8859-1
    assert header.patient_id == "9RG1"
    assert header.birth_date == "1940-03-05"
    assert header.sex == "female"
    assert header.accession_number == ACCESSION
    assert header.study_date == "2004-08-26"
    assert header.study_time == "18:50:59 (UTC-0400)"
    assert header.study_description == "THORAX"


def test_header_missing_attributes_are_empty_not_none() -> None:
    ds = Dataset()
    ds.PatientName = None
    ds.PatientBirthDate = ""
    header = report_header_from(ds)
    assert all(value == "" for value in dataclasses.astuple(header))


def test_pdf_text_layout_and_rendering(content: DraftReportContent, tmp_path: Path) -> None:
    pdf = render_report_pdf(content)
    assert pdf.startswith(b"%PDF-")
    texts = pages_text(pdf)
    assert len(texts) == 1
    text = flat(texts[0])
    assert text.startswith(BANNER_TITLE)  # the banner is the first thing on the page
    for expected in (
        "Müller, Jürgen",
        "9RG1",
        "1940-03-05",
        ACCESSION,
        "2004-08-26 18:50:59",
        "THORAX",
        f"LLM-CXR {VERSION}",
        flat(DEMO_PDF_NOTE),
        flat(FINDINGS),
        IMPRESSION,
        "Image read by the model",
        "Page 1 of 1",
        "Generated 2024-05-06 07:08:09 UTC by llm-cxr-node 0.1.0",
    ):
        assert expected in text, expected
    assert "None" not in text
    assert text.index("Findings") < text.index("Impression")

    reader = PdfReader(io.BytesIO(pdf))
    assert reader.metadata is not None
    assert reader.metadata["/CreationDate"] == "D:20240506070809+00'00'"
    assert "Müller" not in str(dict(reader.metadata))  # no patient data in the metadata
    assert reader.pages[0].images, "the thumbnail is embedded"

    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    assert_not_blank_with_banner(render_png(path, tmp_path / "page"))


def test_no_demo_note_for_a_real_model(content: DraftReportContent) -> None:
    pdf = render_report_pdf(dataclasses.replace(content, demo=False, thumbnail=None))
    text = flat(pages_text(pdf)[0])
    assert "DEMO" not in text
    assert "Image read by the model" not in text
    assert not PdfReader(io.BytesIO(pdf)).pages[0].images


def test_same_inputs_same_bytes_even_in_another_process(content: DraftReportContent) -> None:
    first = render_report_pdf(content)
    assert render_report_pdf(content) == first
    later = render_report_pdf(
        dataclasses.replace(content, generated_at=GENERATED + dt.timedelta(seconds=1))
    )
    assert later != first

    # a fresh interpreter with another time zone and SOURCE_DATE_EPOCH (which reportlab
    # would otherwise use) gives the same bytes
    script = (
        "import datetime as dt, hashlib, sys\n"
        "from integration.report_pdf import DraftReportContent, ReportHeader, "
        "render_report_pdf\n"
        "c = DraftReportContent(header=ReportHeader(patient_name='Müller, Jürgen'), "
        f"impression={IMPRESSION!r}, findings={FINDINGS!r}, model_name='LLM-CXR', "
        f"model_version={VERSION!r}, demo=True, "
        "generated_at=dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC))\n"
        "sys.stdout.write(hashlib.sha256(render_report_pdf(c)).hexdigest())\n"
    )
    env = {**os.environ, "TZ": "Asia/Tokyo", "SOURCE_DATE_EPOCH": "1", "PYTHONHASHSEED": "7"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    local = DraftReportContent(
        header=ReportHeader(patient_name="Müller, Jürgen"),
        impression=IMPRESSION,
        findings=FINDINGS,
        model_name="LLM-CXR",
        model_version=VERSION,
        demo=True,
        generated_at=GENERATED,
    )
    assert out.stdout == hashlib.sha256(render_report_pdf(local)).hexdigest()


def test_long_text_flows_with_banner_on_every_page_and_is_cut_with_a_note(
    content: DraftReportContent, tmp_path: Path
) -> None:
    sentence = "The cardiomediastinal silhouette is within normal limits. "
    long_findings = "\n\n".join(f"Paragraph {i}. " + sentence * 6 for i in range(80))
    assert len(long_findings) > MAX_SECTION_CHARS
    pdf = render_report_pdf(dataclasses.replace(content, findings=long_findings))
    texts = [flat(t) for t in pages_text(pdf)]
    total = len(texts)
    assert total > 2
    for number, text in enumerate(texts, start=1):
        assert text.startswith(BANNER_TITLE), f"page {number} lacks the banner"
        assert f"Page {number} of {total}" in text
    everything = " ".join(texts)
    omitted = len(long_findings.strip()) - MAX_SECTION_CHARS
    assert f"Text cut here: {omitted} further characters are not shown" in everything
    assert IMPRESSION in texts[-1]  # the impression still follows the cut findings
    path = tmp_path / "long.pdf"
    path.write_bytes(pdf)
    assert_not_blank_with_banner(render_png(path, tmp_path / "long"))


def test_many_short_lines_are_cut_too(content: DraftReportContent) -> None:
    lines = "\n".join(f"Line {i}" for i in range(MAX_SECTION_LINES * 5))
    texts = pages_text(render_report_pdf(dataclasses.replace(content, findings=lines)))
    assert len(texts) <= 6
    everything = flat(" ".join(texts))
    assert f"Line {MAX_SECTION_LINES - 1} " in everything
    assert f"Line {MAX_SECTION_LINES} " not in everything
    assert "Text cut here" in everything


def test_characters_outside_the_font_are_replaced_with_a_note(
    content: DraftReportContent,
) -> None:
    assert unrenderable_characters("Müller Jürgen ÆØÅ é ß – € “”") == ""
    assert unrenderable_characters("Дмитрий 山田") == "Дмитрй山田"  # each once, in order
    header = dataclasses.replace(content.header, patient_name="山田, 太郎")
    pdf = render_report_pdf(dataclasses.replace(content, header=header, findings="Дa"))
    text = flat(pages_text(pdf)[0])
    assert "??, ??" in text
    assert "?a" in text
    assert "5 character(s) cannot be shown" in text
    assert "the DICOM SR carries the exact text" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"impression": "  "}, "impression"),
        ({"generated_at": dt.datetime(2024, 5, 6, 7, 8, 9)}, "timezone"),
        ({"thumbnail": np.zeros((4, 4, 3), dtype=np.uint8)}, "thumbnail"),
        ({"thumbnail": np.zeros((4, 4), dtype=np.float32)}, "thumbnail"),
        ({"model_version": " "}, "version"),
    ],
)
def test_invalid_inputs_are_refused(
    content: DraftReportContent, change: dict[str, object], message: str
) -> None:
    with pytest.raises(ReportRenderError, match=message):
        render_report_pdf(dataclasses.replace(content, **change))  # type: ignore[arg-type]
