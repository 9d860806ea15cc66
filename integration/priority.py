"""The urgency of a study, read from the order it carries and from site rules.

A modality copies the order's urgency into the images it makes: Requested Procedure
Priority (0040,1003), a Requested Procedure module attribute (PS3.3 C.4.11) that many
modalities carry over from the Modality Worklist, either at the top level or inside the
Request Attributes Sequence (0040,0275). Its defined terms are ``STAT``, ``HIGH``,
``ROUTINE``, ``MEDIUM`` and ``LOW``. Where modalities do not send it, sites route urgent
work by where it comes from (the emergency department's calling AE Title, a station name,
an institutional department); :class:`PriorityRule` expresses that.

The result is the job priority the queue sorts on (higher first): ``STAT`` 100, ``HIGH``
50, ``ROUTINE``/``MEDIUM`` 0, ``LOW`` -50; the highest of the order's priority and of every
matching rule wins, so a rule can raise a study but an order's ``STAT`` is never lowered.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

__all__ = [
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "ORDER_PRIORITIES",
    "RULE_FIELDS",
    "PriorityRule",
    "order_priority",
    "study_priority",
]

MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
"""The range of a job's priority: what a rule (a priority rule or a routing rule) may give
and what an operator may set."""

# PS3.3 C.4.11 Requested Procedure Priority (0040,1003) defined terms -> queue priority
ORDER_PRIORITIES: Mapping[str, int] = {
    "STAT": 100,
    "HIGH": 50,
    "ROUTINE": 0,
    "MEDIUM": 0,
    "LOW": -50,
}

# what a rule may look at: the association's calling AE Title and these attributes
RULE_FIELDS: tuple[str, ...] = (
    "CallingAETitle",
    "StationName",
    "InstitutionalDepartmentName",
    "InstitutionName",
    "ReferringPhysicianName",
    "RequestingService",
    "StudyDescription",
    "AdmittingDiagnosesDescription",
    "PatientState",
)


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def order_priority(ds: Dataset) -> str | None:
    """The Requested Procedure Priority (0040,1003) the instance carries, upper-cased.

    Looked for at the top level, then in each item of the Request Attributes Sequence
    (0040,0275). Returns ``None`` when absent, empty or not one of the defined terms of
    PS3.3 C.4.11 (an unknown value is ignored rather than guessed).
    """
    candidates: list[object] = [ds.get("RequestedProcedurePriority")]
    for item in ds.get("RequestAttributesSequence") or []:
        candidates.append(item.get("RequestedProcedurePriority"))
    for value in candidates:
        text = _text(value).upper()
        if text in ORDER_PRIORITIES:
            return text
    return None


@dataclass(frozen=True, slots=True)
class PriorityRule:
    """Raise the priority of studies whose attributes match.

    Parameters
    ----------
    when
        Field name (one of :data:`RULE_FIELDS`) -> a case-insensitive shell-style pattern
        (``fnmatch``: ``*`` and ``?``), e.g. ``{"CallingAETitle": "ED_*"}``. Every field
        must match; a field the instance lacks does not match.
    priority
        The job priority a matching study gets at least (higher is drafted first).
    """

    when: Mapping[str, str]
    priority: int

    def __post_init__(self) -> None:
        if not self.when:
            raise ValueError("priority rule: 'when' names no field to match")
        unknown = sorted(set(self.when) - set(RULE_FIELDS))
        if unknown:
            raise ValueError(
                f"priority rule: unknown field(s) {', '.join(unknown)}; "
                f"use {', '.join(RULE_FIELDS)}"
            )
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority rule: priority must be an integer, got {self.priority!r}")
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(
                f"priority rule: priority {self.priority} is outside {MIN_PRIORITY}..{MAX_PRIORITY}"
            )

    def matches(self, ds: Dataset, calling_ae: str | None) -> bool:
        """Whether every field of :attr:`when` matches ``ds`` (and the calling AE)."""
        for name, pattern in self.when.items():
            value = calling_ae if name == "CallingAETitle" else ds.get(name)
            text = _text(value)
            if not text or not fnmatch.fnmatchcase(text.upper(), pattern.strip().upper()):
                return False
        return True


def study_priority(
    ds: Dataset, *, calling_ae: str | None = None, rules: Iterable[PriorityRule] = ()
) -> int:
    """The job priority for the study ``ds`` belongs to.

    Parameters
    ----------
    ds
        A received instance (its header suffices).
    calling_ae
        The sending association's Calling AE Title (PS3.8 A-ASSOCIATE-RQ), if any.
    rules
        The site's :class:`PriorityRule` list.

    Returns
    -------
    int
        The highest of the order's priority (:data:`ORDER_PRIORITIES`, 0 when the order
        states none) and of every matching rule.
    """
    order = order_priority(ds)
    best = ORDER_PRIORITIES[order] if order is not None else 0
    for rule in rules:
        if rule.priority > best and rule.matches(ds, calling_ae):
            best = rule.priority
    return best
