"""The MIMIC-CXR-JPG reader, on a tiny fake tree of the published layout."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest

from models.dataset import read_manifest
from models.training.mimic import MimicError, mimic_manifest, report_sections

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.

 COMPARISON:  None.

 FINDINGS:

 The lungs are clear.  No pleural effusion
 or pneumothorax.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

# subject, study, dicom, view, date, time, split
IMAGES = [
    ("10000032", "50414267", "02aa804e-bde0afdd", "PA", "21800506", "213014.531", "train"),
    ("10000032", "50414267", "174413ec-4ec4c1f7", "LATERAL", "21800506", "213014.531", "train"),
    ("10000032", "53189527", "2a2277a9-b0ded155", "AP", "21800626", "165500.312", "train"),
    ("10000032", "53911762", "68b5c4b1-227d0485", "AP", "21800626", "65100.0", "validate"),
    ("10000764", "57375967", "096052b7-d256dc40", "PA", "21321015", "095210", "test"),
    ("10000764", "59999999", "ffffffff-00000000", "PA", "21330101", "000000", "train"),
]


def _write_csv_gz(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def fake_mimic(tmp_path: Path) -> tuple[Path, Path]:
    root, reports = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr-reports"
    root.mkdir()
    meta, split = [], []
    for subject, study, dicom, view, date, time, part in IMAGES:
        folder = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        image = root / folder / f"s{study}" / f"{dicom}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"\xff\xd8 fake jpeg")
        txt = reports / folder / f"s{study}.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        body = REPORT if study != "59999999" else " WET READ: nothing here\n"
        if study == "57375967":
            body = " IMPRESSION:  Right upper lobe opacity.\n NOTIFICATION: called.\n"
        txt.write_text(body, encoding="utf-8")
        meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "3056", "2544", date, time])
        split.append([dicom, study, subject, part])
    meta.append(["00000000-no-split", "10000764", "57375967", "", "PA", "1", "1", "21321015", "1"])
    _write_csv_gz(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        [
            "dicom_id",
            "subject_id",
            "study_id",
            "PerformedProcedureStepDescription",
            "ViewPosition",
            "Rows",
            "Columns",
            "StudyDate",
            "StudyTime",
        ],
        meta,
    )
    _write_csv_gz(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        split,
    )
    return root, reports


def test_report_sections() -> None:
    assert report_sections(REPORT) == (
        "The lungs are clear. No pleural effusion or pneumothorax.",
        "No acute cardiopulmonary process.",
    )
    assert report_sections("IMPRESSION: A.\nNOTIFICATION: B.") == (None, "A.")
    assert report_sections("FINDINGS:\n\nIMPRESSION: x") == (None, "x")
    assert report_sections("no headings at all") == (None, None)


def test_mimic_manifest(tmp_path: Path) -> None:
    root, reports = fake_mimic(tmp_path)
    manifest, stats = mimic_manifest(root, reports, root / "manifest.jsonl")
    assert (stats.images, stats.records, stats.no_split, stats.no_report) == (7, 5, 1, 1)
    again = read_manifest(root / "manifest.jsonl")
    assert again.sha256 == manifest.sha256
    by_id = {r.id: r for r in again.records}
    first = by_id["s50414267-02aa804e-bde0afdd"]
    assert first.image == root / "files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg"
    assert (first.patient_id, first.study_id, first.view, first.split) == (
        "p10000032",
        "s50414267",
        "PA",
        "train",
    )
    assert first.findings == "The lungs are clear. No pleural effusion or pneumothorax."
    assert first.impression == "No acute cardiopulmonary process."
    assert first.frontal and not by_id["s50414267-174413ec-4ec4c1f7"].frontal
    orders = {r.study_id: r.study_order for r in again.records}
    # patient 10000032: 2180-05-06, then 06-26 06:51, then 06-26 16:55
    assert orders == {"s50414267": 0, "s53189527": 2, "s53911762": 1, "s57375967": 0}
    assert by_id["s53911762-68b5c4b1-227d0485"].split == "validate"
    assert by_id["s57375967-096052b7-d256dc40"].findings is None
    line = (root / "manifest.jsonl").read_text().splitlines()[0]
    assert '"image": "files/p10/' in line  # relative to the manifest's folder


def test_missing_jpg_and_bad_layout(tmp_path: Path) -> None:
    root, reports = fake_mimic(tmp_path)
    (root / "files/p10/p10000032/s53189527/2a2277a9-b0ded155.jpg").unlink()
    _manifest, stats = mimic_manifest(root, reports / "files", tmp_path / "m.jsonl")
    assert stats.no_image == 1 and stats.records == 4
    _manifest, stats = mimic_manifest(root, reports, tmp_path / "m2.jsonl", check_images=False)
    assert stats.records == 5
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(MimicError, match=r"mimic-cxr-2\.0\.0-split\.csv"):
        mimic_manifest(root, reports, tmp_path / "m3.jsonl")
    with pytest.raises(MimicError, match="does not exist"):
        mimic_manifest(root, tmp_path / "absent", tmp_path / "m4.jsonl")
