"""The DIMSE status codes the node's SCP returns, each with its meaning: one place.

Storage statuses follow PS3.4 Table B.2-1 (Storage Service Class): ``0xA7xx`` "Refused: Out
of Resources" (transient: a PACS retries), ``0xA9xx`` "Error: Data Set does not match SOP
Class", ``0xCxxx`` "Error: Cannot understand". Within those ranges the low byte is the node's
own, so every failure has a distinct code that a PACS operator can look up in
``CONFORMANCE.md`` (its table is generated from :data:`STORE_STATUSES`). Verification uses
PS3.4 Annex A (0x0000 only).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "STORE_STATUSES",
    "StatusInfo",
    "StoreStatus",
    "is_failure",
    "is_transient",
    "markdown_table",
    "status_info",
]


class StoreStatus(IntEnum):
    """C-STORE response statuses of the node's Storage SCP (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES_DISK = 0xA700
    OUT_OF_RESOURCES_DATABASE = 0xA701
    OUT_OF_RESOURCES_SPOOL_IO = 0xA702
    MISSING_SOP_INSTANCE_UID = 0xA900
    MISSING_STUDY_INSTANCE_UID = 0xA901
    MISSING_SERIES_INSTANCE_UID = 0xA902
    UID_MISMATCH = 0xA903
    CANNOT_UNDERSTAND = 0xC210
    INTERNAL_ERROR = 0xC2FF


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """What a status code means and whether the sender should retry.

    Parameters
    ----------
    code
        The DIMSE status (PS3.7 Annex C).
    category
        The PS3.4 Table B.2-1 category, e.g. ``"Refused: Out of Resources"``.
    meaning
        What the node means by it (no PHI).
    transient
        Whether a retry later may succeed.
    """

    code: int
    category: str
    meaning: str
    transient: bool

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFFFF:
            raise ValueError(f"DIMSE Status must be 0x0000..0xFFFF, got {self.code!r}")


def _category(code: int) -> str:
    if code == 0x0000:
        return "Success"
    if code & 0xFF00 == 0xA700:
        return "Refused: Out of Resources"
    if code & 0xFF00 == 0xA900:
        return "Error: Data Set does not match SOP Class"
    if code & 0xF000 == 0xC000:
        return "Error: Cannot understand"
    raise ValueError(f"status 0x{code:04X} has no Storage category")


_MEANINGS: dict[StoreStatus, str] = {
    StoreStatus.SUCCESS: (
        "Stored: the instance is in the spool (fsync'd) and its row is committed; "
        "duplicates also answer success (see the duplicate policy)"
    ),
    StoreStatus.OUT_OF_RESOURCES_DISK: (
        "Free space on a file system the node writes to (spool, its staging folder, outputs, "
        "the SQLite database's folder) is below min_free_disk_mb, or the disk is full "
        "(ENOSPC/EDQUOT)"
    ),
    StoreStatus.OUT_OF_RESOURCES_DATABASE: (
        "The database could not record the instance (down, locked, timed out); "
        "the spooled file is removed again"
    ),
    StoreStatus.OUT_OF_RESOURCES_SPOOL_IO: (
        "Another operating-system error while writing the spool (I/O error, permissions)"
    ),
    StoreStatus.MISSING_SOP_INSTANCE_UID: (
        "(0008,0018) SOP Instance UID is absent, empty or not a valid UID"
    ),
    StoreStatus.MISSING_STUDY_INSTANCE_UID: (
        "(0020,000D) Study Instance UID is absent, empty or not a valid UID"
    ),
    StoreStatus.MISSING_SERIES_INSTANCE_UID: (
        "(0020,000E) Series Instance UID is absent, empty or not a valid UID"
    ),
    StoreStatus.UID_MISMATCH: (
        "SOP Class UID or SOP Instance UID in the data set differs from the "
        "Affected SOP Class/Instance UID of the C-STORE request"
    ),
    StoreStatus.CANNOT_UNDERSTAND: (
        "The data set cannot be parsed: truncated value, malformed element encoding, "
        "trailing bytes, elements out of tag order, an invalid Specific Character Set, or "
        "a deflated data set that inflates past deflate_max_ratio / deflate_max_inflated_mb"
    ),
    StoreStatus.INTERNAL_ERROR: "Unexpected error inside the node (a bug; logged with traceback)",
}
STORE_STATUSES: dict[StoreStatus, StatusInfo] = {
    s: StatusInfo(
        code=int(s),
        category=_category(int(s)),
        meaning=_MEANINGS[s],
        transient=int(s) & 0xFF00 == 0xA700,
    )
    for s in StoreStatus
}


def status_info(code: int) -> StatusInfo:
    """Return the node's description of a C-STORE status.

    Parameters
    ----------
    code
        A status the node returns.

    Raises
    ------
    KeyError
        If the node never returns ``code``.
    """
    return STORE_STATUSES[StoreStatus(code)]


def is_failure(code: int) -> bool:
    """Whether ``code`` is a failure: neither Success nor a Warning (PS3.7 C.1, C.3)."""
    return code != 0x0000 and code & 0xF000 != 0xB000 and code not in (0x0001, 0x0107, 0x0116)


def is_transient(code: int) -> bool:
    """Whether a sender may succeed by retrying later (0xA7xx "Refused: Out of Resources")."""
    return code & 0xFF00 == 0xA700


def markdown_table() -> str:
    """The C-STORE status table as Markdown, exactly as it appears in ``CONFORMANCE.md``."""
    lines = [
        "| Status | Name | Category (PS3.4 B.2-1) | Retry | Meaning |",
        "|---|---|---|---|---|",
    ]
    for s, info in STORE_STATUSES.items():
        lines.append(
            f"| 0x{info.code:04X} | {s.name} | {info.category} | "
            f"{'yes' if info.transient else 'no'} | {info.meaning} |"
        )
    return "\n".join(lines)
