"""Fixtures for the report output builders: a real chest CR with realistic order data.

The source is RG1_UNCR (pydicom-data: a real PA chest CR, ISO_IR 100) with a Latin-1
patient name, issuers, an accession number, placer/filler order numbers and a requested
procedure code added, written to disk and read back, so every builder meets text that
pydicom decodes from ISO 8859-1.
"""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from integration.hl7_oru import DraftResult, Hl7Parties
from integration.pixels import to_gray8
from integration.report_pdf import DraftReportContent
from tests.helpers import node_draft_content, require_binary, rg1_file

MODEL, VERSION = "LLM-CXR", "1.0.0-demo"
FINDINGS = (
    "Heart size is normal. The mediastinum is not widened.\n"
    "No focal consolidation, pleural effusion or pneumothorax."
)
IMPRESSION = "No acute cardiopulmonary abnormality."
GENERATED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
PATIENT_NAME = "Müller^Jürgen"
ACCESSION = "ACC-2024-0042"
PLACER, FILLER = "PLC-77812", "FIL-55190"
PATIENT_OID, ACCESSION_OID = "1.2.276.0.7230010.3.1.4.1", "1.2.276.0.7230010.3.1.4.2"
#: the ORU^R01 tests' sending and receiving applications and facilities
PARTIES = Hl7Parties("LLMCXR", "CXRNODE", "RIS", "RADIOLOGY")
#: the draft above (DEMO model) as an HL7 v2 result, as the ORU^R01 builders take it
RESULT = DraftResult(
    impression=IMPRESSION,
    findings=FINDINGS,
    model_name=MODEL,
    model_version=VERSION,
    demo=True,
    report_time=GENERATED,
)

# dciodvfy warnings that come from RG1_UNCR's own header, not from the builders
# the test image's own header; the node's private coding scheme for the CheXpert observations
# SNOMED CT has no code for (integration.coded_findings.LOCAL_SCHEME)
KNOWN_DCIODVFY_WARNINGS = ("Retired Person Name form", "Unrecognized defined term <99LLMCXR>")


def _item(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """RG1_UNCR with order data, stored as ISO_IR 100 and read back (pixels included)."""
    ds = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
    ds = copy.deepcopy(ds)
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    ds.PatientName = PATIENT_NAME
    ds.IssuerOfPatientID = "HOSP-A"
    ds.IssuerOfPatientIDQualifiersSequence = [
        _item(UniversalEntityID=PATIENT_OID, UniversalEntityIDType="ISO", IdentifierTypeCode="MR")
    ]
    ds.AccessionNumber = ACCESSION
    ds.IssuerOfAccessionNumberSequence = [
        _item(
            LocalNamespaceEntityID="RIS-A",
            UniversalEntityID=ACCESSION_OID,
            UniversalEntityIDType="ISO",
        )
    ]
    ds.PlacerOrderNumberImagingServiceRequest = PLACER
    ds.FillerOrderNumberImagingServiceRequest = FILLER
    ds.RequestAttributesSequence = [
        _item(
            RequestedProcedureID="RP-1",
            RequestedProcedureCodeSequence=[
                _item(CodeValue="36643-5", CodingSchemeDesignator="LN", CodeMeaning="XR Chest 2V")
            ],
        )
    ]
    path = tmp_path_factory.mktemp("source") / "source.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert "Müller".encode("latin-1") in path.read_bytes()  # really ISO 8859-1 on disk
    return pydicom.dcmread(path)


@pytest.fixture(scope="session")
def thumbnail(source: Dataset) -> npt.NDArray[np.uint8]:
    """The image the model read, as the node's 8-bit grey conversion gives it."""
    return to_gray8(source)


@pytest.fixture(scope="session")
def content(source: Dataset, thumbnail: npt.NDArray[np.uint8]) -> DraftReportContent:
    return node_draft_content(
        source,
        findings=FINDINGS,
        impression=IMPRESSION,
        model=MODEL,
        version=VERSION,
        generated_at=GENERATED,
        thumbnail=thumbnail,
    )


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, unexpected warning lines) of dciodvfy for ``path``."""
    tool = require_binary("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if "Error" in line]
    warnings = [
        line
        for line in lines
        if line.startswith("Warning") and not any(k in line for k in KNOWN_DCIODVFY_WARNINGS)
    ]
    return errors, warnings


def render_png(pdf_path: Path, out_stem: Path) -> npt.NDArray[np.uint8]:
    """First page of ``pdf_path`` rendered by poppler's pdftoppm, as an RGB array."""
    tool = require_binary("pdftoppm")
    subprocess.run(
        [
            tool,
            "-r",
            "50",
            "-png",
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            str(pdf_path),
            str(out_stem),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    png = out_stem.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 0
    return np.asarray(Image.open(png).convert("RGB"))


def assert_not_blank_with_banner(page: npt.NDArray[np.uint8]) -> None:
    """The page has content, and its top band is the dark red banner with white text."""
    assert page.std() > 20, "rendered page is (almost) uniform"
    height = page.shape[0]
    band = page[int(height * 0.06) : int(height * 0.11)]
    red = (band[..., 0] > 120) & (band[..., 1] < 60) & (band[..., 2] < 60)
    white = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] > 200)
    assert red.mean() > 0.4, f"no red banner at the top (red fraction {red.mean():.2f})"
    assert white.any(), "no white banner text"
