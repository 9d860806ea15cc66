"""CheXpert's special cases: normal statements, stable heart size, hedged edema, heart failure.

Each rule is simple to state and listed here as data; ``docs/labeler.md`` repeats the list.

- :data:`STATEMENTS` are whole-phrase patterns that set a label directly for the heart and
  mediastinum, where the mention lists are weakest: "heart size is normal" makes Cardiomegaly
  negative even though "heart" alone is no mention in CheXpert's list, and "stable
  cardiomediastinal silhouette" makes Enlarged Cardiomediastinum uncertain (CheXpert's rule:
  stable/unchanged heart or mediastinum, with no word about its size, is uncertain). A
  statement's label replaces what the generic rules would give a mention of the same
  observation inside its span.
- :data:`HEDGED_MENTIONS`: CheXpert counts "vascular congestion", "pulmonary congestion",
  "indistinctness" and "vascular prominence" as at most uncertain for Edema.
- :data:`HEART_FAILURE_MENTIONS`: a positive or uncertain "CHF" / "heart failure" (an Edema
  mention) also makes Cardiomegaly uncertain, as CheXpert does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.labeler.observations import Label, Observation

_CARDIO = Observation.CARDIOMEGALY
_MEDIASTINUM = Observation.ENLARGED_CARDIOMEDIASTINUM

_VERB = r"(?:\s+(?:is|are|appears?|remains?|looks?|seems?))?"
_ADVERB = r"(?:\s+(?:otherwise|now|again|still|overall|grossly))?"
_NORMAL = (
    r"\s+(?:normal|unremarkable|within\s+normal\s+limits|not\s+enlarged|normal\s+in\s+size"
    r"|of\s+normal\s+size)(?![a-z0-9])"
)
_STABLE = r"\s+(?:stable|unchanged|similar)(?![a-z0-9])"
_HEART = r"(?:the\s+)?(?:heart(?:\s+size)?|cardiac\s+(?:size|silhouette|contours?|shadow))"
_MEDIASTINAL = (
    r"(?:the\s+)?(?:(?:cardio)?mediastinal\s+(?:silhouettes?|contours?|configuration)"
    r"|mediastinum)"
)
_HEART_AND_MEDIASTINUM = (
    r"(?:the\s+)?(?:heart|cardiac)(?:\s+size)?\s+and\s+(?:the\s+)?"
    r"(?:mediastinum|mediastinal\s+(?:silhouettes?|contours?))"
)


@dataclass(frozen=True)
class Statement:
    """A phrase that sets ``label`` for ``observations``; ``example`` is tested."""

    name: str
    pattern: re.Pattern[str]
    observations: tuple[Observation, ...]
    label: Label
    example: str


def _statement(
    name: str, regex: str, observations: tuple[Observation, ...], label: Label, example: str
) -> Statement:
    return Statement(name, re.compile(r"(?<![a-z0-9])" + regex), observations, label, example)


STATEMENTS: tuple[Statement, ...] = (
    _statement(
        "heart and mediastinum normal",
        _HEART_AND_MEDIASTINUM + _VERB + _ADVERB + _NORMAL,
        (_CARDIO, _MEDIASTINUM),
        Label.NEGATIVE,
        "Heart and mediastinum are within normal limits.",
    ),
    _statement(
        "heart normal",
        _HEART + _VERB + _ADVERB + _NORMAL,
        (_CARDIO,),
        Label.NEGATIVE,
        "Heart is normal in size.",
    ),
    _statement(
        "normal heart",
        r"(?:normal|unremarkable)(?:[- ]sized)?\s+"
        r"(?:heart|cardiac\s+(?:size|silhouette|contours?))",
        (_CARDIO,),
        Label.NEGATIVE,
        "Normal-sized heart.",
    ),
    _statement(
        "mediastinum normal",
        _MEDIASTINAL + _VERB + _ADVERB + r"(?:" + _NORMAL + r"|\s+not\s+widened)",
        (_MEDIASTINUM,),
        Label.NEGATIVE,
        "The cardiomediastinal silhouette is unremarkable.",
    ),
    _statement(
        "normal mediastinum",
        r"(?:normal|unremarkable)\s+(?:(?:cardio)?mediastinal\s+(?:silhouettes?|contours?"
        r"|configuration)|mediastinum)",
        (_MEDIASTINUM,),
        Label.NEGATIVE,
        "Unremarkable cardiomediastinal silhouette.",
    ),
    _statement(
        "heart stable",
        _HEART + _VERB + _ADVERB + _STABLE,
        (_CARDIO,),
        Label.UNCERTAIN,
        "Heart size is stable.",
    ),
    _statement(
        "stable heart",
        r"(?:stable|unchanged)\s+(?:heart(?:\s+size)?|cardiac\s+(?:size|silhouette|contours?))",
        (_CARDIO,),
        Label.UNCERTAIN,
        "Unchanged cardiac silhouette.",
    ),
    _statement(
        "mediastinum stable",
        _MEDIASTINAL + _VERB + _ADVERB + _STABLE,
        (_MEDIASTINUM,),
        Label.UNCERTAIN,
        "Mediastinal contours are unchanged.",
    ),
    _statement(
        "stable mediastinum",
        r"(?:stable|unchanged)\s+(?:(?:cardio)?mediastinal\s+(?:silhouettes?|contours?"
        r"|configuration)|mediastinum)",
        (_MEDIASTINUM,),
        Label.UNCERTAIN,
        "Stable cardiomediastinal silhouette.",
    ),
)
"""Normal and stable statements about the heart and mediastinum, tried in this order; a
later statement is ignored where it overlaps an earlier one for the same observation."""

HEDGED_MENTIONS: tuple[str, ...] = (
    "vascular congestion",
    "pulmonary congestion",
    "indistinctness",
    "vascular prominence",
)
"""Edema mentions that are never more than uncertain."""

HEART_FAILURE_MENTIONS: tuple[str, ...] = ("chf", "heart failure")
"""Edema mentions that, positive or uncertain, make Cardiomegaly uncertain."""
