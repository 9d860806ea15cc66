"""Study assembly: the chest rule that decides which completed studies become jobs.

DICOM has no end-of-study signal, so a study is taken as complete after a quiet period
without new instances, or forcibly after a maximum wait (see ``docs/policies.md``); the
sweep itself lives in :func:`node.db.study_completion.complete_quiet_studies` and runs from
:mod:`node.runtime.scheduler`. This module holds the pure decision, so it can be tested and reused
without a database.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from node.settings import ChestRule

__all__ = ["ChestDecision", "SeriesFacts", "evaluate_chest_rule"]


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """What the chest rule looks at in one series (PS3.3 C.7.3.1 General Series)."""

    modality: str | None
    body_part_examined: str | None
    series_description: str | None


@dataclass(frozen=True, slots=True)
class ChestDecision:
    """Outcome of the chest rule for a study: ``qualifies`` or a ``reason`` for skipping."""

    qualifies: bool
    reason: str


def _mentions(text: str | None, keywords: Iterable[str]) -> str | None:
    if not text:
        return None
    upper = text.upper()
    for kw in keywords:
        if kw in upper:
            return kw
    return None


def evaluate_chest_rule(
    rule: ChestRule, *, study_description: str | None, series: Sequence[SeriesFacts]
) -> ChestDecision:
    """Decide whether a study is a chest radiograph that should become a job.

    A study qualifies when at least one series has Modality (0008,0060) in
    ``rule.modalities`` and, unless ``rule.require_keyword`` is false, its Body Part
    Examined (0018,0015) or, with ``rule.match_descriptions``, its Series Description
    (0008,103E) or the Study Description (0008,1030) contains a keyword. The reason never
    quotes descriptions (free text may hold identifying data); it names modalities and
    body parts only.

    Parameters
    ----------
    rule
        The configured chest rule.
    study_description
        Study Description of the study, if any.
    series
        One entry per received series.
    """
    if not series:
        return ChestDecision(False, "no series received")
    modalities = sorted({(s.modality or "").upper() or "none" for s in series})
    candidates = [s for s in series if (s.modality or "").upper() in rule.modalities]
    if not candidates:
        return ChestDecision(
            False,
            f"modality {', '.join(modalities)} is not one of {', '.join(rule.modalities)}",
        )
    if not rule.require_keyword:
        return ChestDecision(True, f"modality {candidates[0].modality} (no keyword required)")
    for s in candidates:
        kw = _mentions(s.body_part_examined, rule.keywords)
        if kw:
            return ChestDecision(True, f"modality {s.modality}, body part mentions {kw}")
        if rule.match_descriptions:
            kw = _mentions(s.series_description, rule.keywords)
            if kw:
                return ChestDecision(
                    True, f"modality {s.modality}, series description mentions {kw}"
                )
    if rule.match_descriptions:
        kw = _mentions(study_description, rule.keywords)
        if kw:
            return ChestDecision(True, f"study description mentions {kw}")
    parts = sorted({(s.body_part_examined or "none").upper() for s in candidates})
    where = "body part" + (" or description" if rule.match_descriptions else "")
    return ChestDecision(
        False,
        f"modality {', '.join(modalities)} but no {where} mentions "
        f"{'/'.join(rule.keywords)} (body part: {', '.join(parts)})",
    )
