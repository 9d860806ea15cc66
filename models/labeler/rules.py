"""The weight-free CheXpert-style rule labeler.

For each sentence (:mod:`models.labeler.sentences`): find the normal/stable statements
(:mod:`models.labeler.special_cases`) and the mentions of each observation
(:mod:`models.labeler.phrases`), give each mention a label from the negation and uncertainty
triggers around it (:mod:`models.labeler.context`), then aggregate per report as CheXpert
does:

- per observation, positive beats uncertain beats negative; no mention is ``not_mentioned``;
- **No Finding** is positive when no observation other than Support Devices, and none of
  CheXpert's "other findings" (emphysema, scoliosis, ...), is positive or uncertain, and
  ``not_mentioned`` otherwise (CheXpert never labels it negative); an empty report is
  ``not_mentioned`` throughout (a deliberate difference: CheXpert would call it No Finding).

Deterministic, offline, no model; it never logs report text. ``docs/labeler.md`` describes
the rules and their limits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from models.labeler.base import Labels
from models.labeler.context import CueSet, SentenceContext
from models.labeler.observations import FINDINGS, OBSERVATIONS, Label, Observation
from models.labeler.phrases import PhraseLists, load_phrase_lists
from models.labeler.sentences import normalise, split_sentences
from models.labeler.special_cases import (
    HEART_FAILURE_MENTIONS,
    HEDGED_MENTIONS,
    STATEMENTS,
    Statement,
)
from models.labeler.triggers import TERMINATORS, TRIGGERS, Trigger

RULES_VERSION = "1"
"""Bumped whenever a rule or list changes the labels of some report."""


@dataclass(frozen=True)
class Mention:
    """One labelled mention, for explaining a report's labels.

    ``observation`` is ``None`` for one of CheXpert's other findings. ``start`` and ``end``
    are offsets into the report text. ``cue`` names what set the label: a trigger phrase, a
    ``statement: <name>``, a special rule, or ``None`` for a plain positive mention.
    """

    observation: Observation | None
    label: Label
    start: int
    end: int
    sentence: int
    cue: str | None


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _first_matches(patterns: Iterable[re.Pattern[str]], text: str) -> list[tuple[int, int]]:
    """Spans of all matches, overlapping ones reduced to the earliest, longest."""
    spans = sorted(
        {(m.start(), m.end()) for p in patterns for m in p.finditer(text)},
        key=lambda s: (s[0], -s[1]),
    )
    kept: list[tuple[int, int]] = []
    for span in spans:
        if not any(_overlaps(span, k) for k in kept):
            kept.append(span)
    return kept


class RuleLabeler:
    """CheXpert's phrase lists with NegEx/ConText-style negation and uncertainty rules."""

    name = f"chexpert-rules/{RULES_VERSION}"

    def __init__(
        self,
        phrases: PhraseLists | None = None,
        *,
        triggers: tuple[Trigger, ...] = TRIGGERS,
        terminators: tuple[str, ...] = TERMINATORS,
        statements: tuple[Statement, ...] = STATEMENTS,
    ) -> None:
        self.phrases = phrases if phrases is not None else load_phrase_lists()
        self.cues = CueSet(triggers, terminators)
        self.statements = statements
        self._hedged = tuple(re.compile(re.escape(p)) for p in HEDGED_MENTIONS)
        self._heart_failure = tuple(re.compile(re.escape(p)) for p in HEART_FAILURE_MENTIONS)

    def mentions(self, text: str) -> list[Mention]:
        """Every labelled mention in ``text``, sentence by sentence."""
        out: list[Mention] = []
        for index, sentence in enumerate(split_sentences(normalise(text))):
            out.extend(self._sentence_mentions(sentence.text, sentence.start, index))
        return out

    def _sentence_mentions(self, text: str, offset: int, index: int) -> list[Mention]:
        context = SentenceContext(text, self.cues)
        out: list[Mention] = []

        def add(
            obs: Observation | None, label: Label, span: tuple[int, int], cue: str | None
        ) -> None:
            out.append(Mention(obs, label, span[0] + offset, span[1] + offset, index, cue))

        def contextual(span: tuple[int, int]) -> tuple[Label, str | None]:
            label, trigger = context.label(*span)
            return label, trigger.phrase if trigger is not None else None

        claimed: dict[Observation, list[tuple[int, int]]] = {}
        for statement in self.statements:
            for m in statement.pattern.finditer(text):
                for obs in statement.observations:
                    spans = claimed.setdefault(obs, [])
                    if not any(_overlaps(m.span(), s) for s in spans):
                        spans.append(m.span())
                        add(obs, statement.label, m.span(), f"statement: {statement.name}")
        for obs in FINDINGS:
            blocked = _first_matches(self.phrases.unmentions[obs], text) + claimed.get(obs, [])
            for span in _first_matches(self.phrases.mentions[obs], text):
                if any(_overlaps(span, s) for s in blocked):
                    continue
                label, cue = contextual(span)
                phrase = text[span[0] : span[1]]
                if obs is Observation.EDEMA and label is not Label.NEGATIVE:
                    if label is Label.POSITIVE and any(p.match(phrase) for p in self._hedged):
                        label, cue = Label.UNCERTAIN, "special: hedged edema mention"
                    if any(p.match(phrase) for p in self._heart_failure):
                        add(
                            Observation.CARDIOMEGALY,
                            Label.UNCERTAIN,
                            span,
                            "special: heart failure",
                        )
                add(obs, label, span, cue)
        for span in _first_matches(self.phrases.other_findings, text):
            label, cue = contextual(span)
            add(None, label, span, cue)
        return out

    def label(self, text: str) -> Labels:
        """One label per observation (all 14, CheXpert's order)."""
        return aggregate(self.mentions(text), empty=not text.strip())

    def label_batch(self, texts: Iterable[str]) -> list[Labels]:
        """:meth:`label` for each text, in order."""
        return [self.label(t) for t in texts]


def aggregate(mentions: Iterable[Mention], *, empty: bool = False) -> Labels:
    """CheXpert's report-level labels from labelled mentions (see the module docstring)."""
    labels = dict.fromkeys(OBSERVATIONS, Label.NOT_MENTIONED)
    finding = False
    for mention in mentions:
        present = mention.label in (Label.POSITIVE, Label.UNCERTAIN)
        if present and mention.observation is not Observation.SUPPORT_DEVICES:
            finding = True
        obs = mention.observation
        if obs is not None and mention.label.precedence > labels[obs].precedence:
            labels[obs] = mention.label
    if not empty and not finding:
        labels[Observation.NO_FINDING] = Label.POSITIVE
    return labels


@lru_cache(maxsize=1)
def default_labeler() -> RuleLabeler:
    """The rule labeler with the packaged phrase lists (built once per process)."""
    return RuleLabeler()


def label_report(text: str) -> Labels:
    """Label one report with :func:`default_labeler`."""
    return default_labeler().label(text)


def label_reports(texts: Iterable[str]) -> list[Labels]:
    """Label many reports with :func:`default_labeler`, in order."""
    return default_labeler().label_batch(texts)
