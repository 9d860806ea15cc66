"""A MIMIC-CXR-JPG tree and the MIMIC-CXR reports -> a :mod:`models.dataset` manifest.

Layout read (PhysioNet's MIMIC-CXR-JPG 2.0.0 / 2.1.0 and MIMIC-CXR 2.0.0 reports)::

    ROOT/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition,
                                             StudyDate (YYYYMMDD), StudyTime (HHMMSS.fff)
    ROOT/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split
    ROOT/files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg
    REPORTS/files/pXX/pNNNNNNNN/sNNNNNNNN.txt  (REPORTS may also be the ``files`` folder)

Each image becomes one record: id ``s<study>-<dicom_id>``, ``patient_id`` ``p<subject>``,
``study_id`` ``s<study>``, ``view`` the ViewPosition, ``split`` as in the split file, the
report's ``FINDINGS:`` and ``IMPRESSION:`` sections (whitespace collapsed), and
``study_order`` numbering a patient's studies by (StudyDate, StudyTime) from 0. Images
without a split, without a JPG on disk, or whose report has neither section are left out
and counted in :class:`MimicStats` (counts only: no identifiers are logged).
"""

from __future__ import annotations

import csv
import gzip
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from models.dataset import Manifest, ManifestRecord, write_manifest

__all__ = [
    "METADATA_CSV",
    "SPLIT_CSV",
    "MimicError",
    "MimicStats",
    "mimic_manifest",
    "mimic_records",
    "report_sections",
]

log = logging.getLogger(__name__)

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
_SPLITS = {"train": "train", "validate": "validate", "test": "test"}
#: a section heading at the start of a line: upper-case words and a colon
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&,()-]*?)[ \t]*:", re.MULTILINE)


class MimicError(ValueError):
    """The MIMIC-CXR-JPG root or the reports folder is not in the expected layout."""


@dataclass
class MimicStats:
    """What :func:`mimic_records` read and left out (counts only)."""

    images: int = 0
    records: int = 0
    no_split: int = 0
    no_image: int = 0
    no_report: int = 0


def _open_csv(root: Path, name: str) -> Iterator[dict[str, str]]:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rt", encoding="utf-8", newline="") as fh:  # type: ignore[operator]
                yield from csv.DictReader(fh)
            return
    raise MimicError(f"{root} has neither {name}.gz nor {name}")


def report_sections(text: str) -> tuple[str | None, str | None]:
    """``(findings, impression)`` of a MIMIC-CXR report (``None`` for a missing or empty
    section); a section runs to the next upper-case heading at the start of a line."""
    marks = list(_HEADING.finditer(text))
    found: dict[str, str] = {}
    for k, m in enumerate(marks):
        name = m.group(1).strip()
        if name not in ("FINDINGS", "IMPRESSION"):
            continue
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        body = " ".join(text[m.end() : end].split())
        if body:
            found[name] = f"{found[name]} {body}" if name in found else body
    return found.get("FINDINGS"), found.get("IMPRESSION")


def _study_orders(rows: list[dict[str, str]]) -> dict[tuple[str, str], int]:
    """(subject, study) -> the study's rank among the patient's studies in time."""
    when: dict[tuple[str, str], tuple[str, float, str]] = {}
    for row in rows:
        key = (row["subject_id"], row["study_id"])
        try:
            time_of_day = float(row.get("StudyTime") or 0.0)
        except ValueError:
            time_of_day = 0.0
        stamp = (row.get("StudyDate") or "", time_of_day, row["study_id"])
        when[key] = min(when.get(key, stamp), stamp)
    by_patient: dict[str, list[tuple[tuple[str, float, str], str]]] = defaultdict(list)
    for (subject, study), stamp in when.items():
        by_patient[subject].append((stamp, study))
    orders = {}
    for subject, studies in by_patient.items():
        for rank, (_stamp, study) in enumerate(sorted(studies)):
            orders[(subject, study)] = rank
    return orders


def _reports_files(reports: Path) -> Path:
    if (reports / "files").is_dir():
        return reports / "files"
    if reports.is_dir():
        return reports
    raise MimicError(f"the reports folder {reports} does not exist")


def mimic_records(
    root: Path | str, reports: Path | str, *, check_images: bool = True
) -> tuple[list[ManifestRecord], MimicStats]:
    """The manifest records of a MIMIC-CXR-JPG tree (see the module docstring).

    Parameters
    ----------
    root
        The MIMIC-CXR-JPG folder (the CSVs and ``files/``).
    reports
        The MIMIC-CXR reports folder (holding ``files/``, or ``files/`` itself).
    check_images
        Leave out images whose JPG is not on disk.

    Raises
    ------
    MimicError
        A CSV is missing or lacks a column, or the reports folder does not exist.
    """
    root = Path(root)
    report_root = _reports_files(Path(reports))
    try:
        splits = {row["dicom_id"]: row["split"] for row in _open_csv(root, SPLIT_CSV)}
        rows = list(_open_csv(root, METADATA_CSV))
        orders = _study_orders(rows)
    except KeyError as exc:
        raise MimicError(f"a MIMIC-CXR CSV under {root} lacks the column {exc}") from None
    stats = MimicStats()
    records: list[ManifestRecord] = []
    sections: dict[Path, tuple[str | None, str | None]] = {}
    for row in rows:
        stats.images += 1
        dicom, subject, study = row["dicom_id"], row["subject_id"], row["study_id"]
        split = _SPLITS.get(splits.get(dicom, ""))
        if split is None:
            stats.no_split += 1
            continue
        folder = Path(f"p{subject[:2]}") / f"p{subject}"
        image = root / "files" / folder / f"s{study}" / f"{dicom}.jpg"
        if check_images and not image.is_file():
            stats.no_image += 1
            continue
        txt = report_root / folder / f"s{study}.txt"
        if txt not in sections:
            text = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""
            sections[txt] = report_sections(text)
        findings, impression = sections[txt]
        if findings is None and impression is None:
            stats.no_report += 1
            continue
        records.append(
            ManifestRecord(
                id=f"s{study}-{dicom}",
                image=image,
                split=split,
                patient_id=f"p{subject}",
                study_id=f"s{study}",
                view=(row.get("ViewPosition") or "").strip() or None,
                study_order=orders[(subject, study)],
                findings=findings,
                impression=impression,
            )
        )
    stats.records = len(records)
    return records, stats


def mimic_manifest(
    root: Path | str, reports: Path | str, out: Path | str, *, check_images: bool = True
) -> tuple[Manifest, MimicStats]:
    """Write the manifest of a MIMIC-CXR-JPG tree to ``out`` (JSON Lines, images relative
    to ``out``'s folder where they lie under it) and return it read back with the stats.

    Raises
    ------
    MimicError
        As :func:`mimic_records`, or when no image has a split and a report.
    """
    records, stats = mimic_records(root, reports, check_images=check_images)
    if not records:
        raise MimicError(
            f"no usable image under {root}: {stats.images} image(s) in the metadata, "
            f"{stats.no_split} without a split, {stats.no_image} without a JPG, "
            f"{stats.no_report} without FINDINGS/IMPRESSION"
        )
    manifest = write_manifest(out, records)
    log.info(
        "MIMIC-CXR manifest: %d record(s) of %d image(s) (%d without split, %d without JPG, "
        "%d without report sections)",
        stats.records,
        stats.images,
        stats.no_split,
        stats.no_image,
        stats.no_report,
    )
    return manifest, stats
