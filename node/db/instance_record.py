"""What recording a received instance in SQL takes and gives (the ingest's SQL contract).

:class:`InstanceRecord` is a received, spooled and fsync'd SOP instance with its UIDs
checked (PS3.5 9.1) and its free-text attributes clipped to their columns;
:class:`RecordOutcome` and :class:`RecordResult` say what
:func:`node.db.studies.record_instance_detailed` did with it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

__all__ = ["InstanceRecord", "RecordOutcome", "RecordResult", "clip"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DA = re.compile(r"^[0-9]{8}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def clip(value: str | None, n: int) -> str | None:
    """``value`` without surrounding spaces, cut to ``n`` characters; ``None`` when empty."""
    if value is None:
        return None
    value = value.strip()
    return value[:n] if value else None


@dataclass(frozen=True)
class InstanceRecord:
    """A received, spooled and fsync'd SOP instance, as recorded in SQL at ingest.

    Recorded by :func:`node.db.studies.record_instance` (PS3.4 B.2.3: before the C-STORE
    response).

    UIDs follow PS3.5 §9.1 (digits and dots, at most 64 characters). ``spool_path`` is
    relative to the spool directory. Free-text attributes are clipped to their column size.
    ``priority`` is the job priority the instance asks for (``integration.priority``: the
    order's Requested Procedure Priority and the site's rules), -1000..1000, higher first.

    Raises
    ------
    ValueError
        When a UID is invalid, ``size_bytes`` is negative, ``sha256`` is not 64 lowercase hex
        digits, ``spool_path`` is not relative to the spool, ``received_at`` is naive, or
        ``priority`` is not an integer in -1000..1000.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    study_description: str | None
    series_description: str | None
    view_position: str | None
    spool_path: str
    size_bytes: int
    sha256: str
    calling_ae: str | None
    received_at: datetime
    priority: int = 0
    accession_number: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    study_date: str | None = None
    association_id: int | None = None

    def __post_init__(self) -> None:
        for name, concept in (
            ("study_uid", "Study Instance UID (0020,000D)"),
            ("series_uid", "Series Instance UID (0020,000E)"),
            ("sop_instance_uid", "SOP Instance UID (0008,0018)"),
            ("sop_class_uid", "SOP Class UID (0008,0016)"),
            ("transfer_syntax_uid", "Transfer Syntax UID (0002,0010)"),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
                raise ValueError(f"{concept} {value!r} is not a valid UID (PS3.5 §9.1)")
        if self.size_bytes < 0:
            raise ValueError(f"size_bytes must not be negative, got {self.size_bytes}")
        if not _SHA256.match(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if not self.spool_path or self.spool_path.startswith("/") or ".." in self.spool_path:
            raise ValueError(f"spool_path {self.spool_path!r} must be relative to the spool")
        if self.received_at.tzinfo is None:
            raise ValueError("received_at must be timezone-aware")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority must be an integer, got {self.priority!r}")
        if not -1000 <= self.priority <= 1000:
            raise ValueError(f"priority {self.priority} is outside -1000..1000")
        for name, n in (
            ("modality", 16),
            ("body_part_examined", 64),
            ("study_description", 64),
            ("series_description", 64),
            ("view_position", 16),
            ("calling_ae", 16),
            ("accession_number", 16),
            ("patient_name", 200),
            ("patient_id", 64),
        ):
            object.__setattr__(self, name, clip(getattr(self, name), n))
        # Study Date (0008,0020), DA: YYYYMMDD; anything else is not recorded
        if self.study_date is not None and not _DA.match(self.study_date):
            object.__setattr__(self, "study_date", None)


class RecordOutcome(enum.StrEnum):
    """What :func:`node.db.studies.record_instance` did with an instance.

    Policy: ``docs/policies.md``; a duplicate is an instance whose SOP Instance UID
    (0008,0018), PS3.6, was received before.
    """

    new = "new"
    duplicate_identical = "duplicate_identical"
    duplicate_replaced = "duplicate_replaced"
    late_for_finished_study = "late_for_finished_study"


@dataclass(frozen=True)
class RecordResult:
    """Detailed result of :func:`node.db.studies.record_instance_detailed`.

    ``obsolete_spool_path`` is a spool file (relative) that the caller should delete after
    the commit: the just-written file of an identical duplicate when it lies elsewhere, or
    the replaced file of a changed duplicate. ``None`` when nothing is obsolete.
    """

    outcome: RecordOutcome
    instance_id: int
    study_id: int
    job_id: int | None
    obsolete_spool_path: str | None
    late: bool
