"""The facts the routing rules look at, for a stored study or a DICOM header.

What the database records (:func:`node.db.study_facts.recorded_facts`) is used as it is.
Attributes the database does not record (General Equipment C.7.5.1: Station Name,
Institution Name, Institutional Department Name, Manufacturer; Patient C.7.1.1 / Patient
Study C.7.2.2: Patient's Sex, Patient's Age, Patient's Birth Date, and the Study Date) are
read, only when a rule needs them (:attr:`integration.routing.RuleSet.needs_header`), from
the header of each series' first instance in the spool (no pixel data; at most
:data:`MAX_HEADER_READS` files per study). The completion sweep gets them through
:func:`facts_reader`. The facts hold patient data: they are evaluated, never logged or
stored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from integration.routing import HEADER_ATTRIBUTES, RuleSet
from node.db.models import Instance, Series, Study
from node.db.study_facts import FactsOf, recorded_facts

__all__ = [
    "MAX_HEADER_READS",
    "facts_from_dataset",
    "facts_reader",
    "read_header",
    "study_facts",
]

log = logging.getLogger(__name__)

MAX_HEADER_READS = 32
# what a header read keeps: the rule attributes, the dates of the computed age, the charset
_HEADER_TAGS = [
    "SpecificCharacterSet",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "SeriesDescription",
    "StudyDescription",
    "PatientBirthDate",
    "StudyDate",
    *sorted(HEADER_ATTRIBUTES),
]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        value = value[0] if len(value) else ""
    text = str(value).strip().rstrip("\x00").strip()
    return text or None


def facts_from_dataset(ds: Dataset, *, calling_ae: str | None = None) -> dict[str, Any]:
    """The rule facts of one data set (its header suffices) and the calling AE title."""
    facts: dict[str, Any] = {
        kw: _text(ds.get(kw)) for kw in _HEADER_TAGS if kw != "SpecificCharacterSet"
    }
    facts["CallingAETitle"] = (calling_ae or "").strip() or None
    return facts


def read_header(source: str | Path | BinaryIO) -> Dataset:
    """Read a Part 10 file's header (no pixel data, only the rule attributes).

    Raises
    ------
    pydicom.errors.InvalidDicomError
        Not a DICOM Part 10 file.
    """
    return pydicom.dcmread(source, stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def study_facts(
    session: Session, study: Study, *, rules: RuleSet, spool_dir: Path | None
) -> list[dict[str, Any]]:
    """One :data:`~integration.routing.Facts` mapping per series of ``study`` (in order):
    what the database records (:func:`node.db.study_facts.recorded_facts`) and, when the
    rules need more, the header of each series' first instance in the spool.

    Parameters
    ----------
    session
        An open session (the study's transaction).
    study
        The study row.
    rules
        The rule set: the spool is read only when it needs unrecorded attributes.
    spool_dir
        The spool root (``None``: nothing is read from files).
    """
    out = recorded_facts(session, study)
    if not rules.needs_header or spool_dir is None:
        return out
    series_rows = session.scalars(
        select(Series).where(Series.study_id == study.id).order_by(Series.id)
    ).all()
    for facts, s in zip(out[:MAX_HEADER_READS], series_rows, strict=False):
        facts.update(_series_header(session, s, spool_dir))
    return out


def facts_reader(rules: RuleSet, spool_dir: Path | None) -> FactsOf:
    """:func:`study_facts` with ``rules`` and ``spool_dir`` bound: the ``facts_of`` that
    :func:`node.db.study_completion.complete_quiet_studies` takes."""
    return lambda session, study: study_facts(session, study, rules=rules, spool_dir=spool_dir)


def _series_header(session: Session, series: Series, spool_dir: Path) -> dict[str, Any]:
    """The unrecorded attributes from the header of the series' first instance."""
    path = session.scalar(
        select(Instance.spool_path)
        .where(Instance.series_id == series.id)
        .order_by(Instance.id)
        .limit(1)
    )
    if not path:
        return {}
    try:
        ds = read_header(spool_dir / path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        log.warning(
            "routing: header of series %s not readable (%s)",
            series.series_instance_uid,
            type(exc).__name__,
        )
        return {}
    facts = facts_from_dataset(ds)
    return {
        kw: facts.get(kw) for kw in (*sorted(HEADER_ATTRIBUTES), "PatientBirthDate", "StudyDate")
    }
