"""Negation and uncertainty scopes in one sentence (NegEx/ConText-style, no parser).

:class:`SentenceContext` finds the triggers and terminators (compiled once in a
:class:`CueSet`) of one normalised sentence; :meth:`SentenceContext.label` then says whether
a mention at a given span is negated, uncertain or positive, and which trigger decided. The
rules are in :mod:`models.labeler.triggers`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

from models.labeler.observations import Label
from models.labeler.triggers import (
    TERMINATOR_PUNCTUATION,
    TERMINATORS,
    TRIGGERS,
    Cue,
    Direction,
    Trigger,
)

_WORD = re.compile(r"[a-z0-9]+")


def cue_pattern(phrase: str) -> re.Pattern[str]:
    """A whole-word, white-space-tolerant pattern for a trigger or terminator phrase."""
    body = r"\s+".join(re.escape(w) for w in phrase.split())
    return re.compile(r"(?<![a-z0-9])" + body + r"(?![a-z0-9])")


class CueSet:
    """Triggers and terminators compiled once, for any number of sentences."""

    def __init__(
        self, triggers: tuple[Trigger, ...] = TRIGGERS, terminators: tuple[str, ...] = TERMINATORS
    ) -> None:
        self.triggers = tuple((t, cue_pattern(t.phrase)) for t in triggers)
        self.terminators = tuple(cue_pattern(p) for p in terminators)


@dataclass(frozen=True)
class CueMatch:
    """A trigger found in a sentence: character span and word span (inclusive)."""

    trigger: Trigger
    start: int
    end: int
    first_word: int
    last_word: int


class SentenceContext:
    """The triggers and scope boundaries of one normalised sentence."""

    def __init__(self, sentence: str, cues: CueSet) -> None:
        self._word_starts = [m.start() for m in _WORD.finditer(sentence)]
        self._word_ends = [m.end() for m in _WORD.finditer(sentence)]
        self.cues = self._resolve(
            [(t, m.start(), m.end()) for t, p in cues.triggers for m in p.finditer(sentence)]
        )
        breaks = [m.start() for p in cues.terminators for m in p.finditer(sentence)]
        breaks += [i for i, c in enumerate(sentence) if c in TERMINATOR_PUNCTUATION]
        self._breaks = sorted(breaks)
        self._commas = [i for i, c in enumerate(sentence) if c == ","]

    def _word_at(self, offset: int) -> int:
        """Index of the word that starts at or before ``offset``."""
        return max(bisect.bisect_right(self._word_starts, offset) - 1, 0)

    def _word_ending_at(self, offset: int) -> int:
        """Index of the last word that ends at or before ``offset``."""
        return max(bisect.bisect_right(self._word_ends, offset) - 1, 0)

    def _resolve(self, found: list[tuple[Trigger, int, int]]) -> list[CueMatch]:
        """Keep the longest of overlapping triggers, then drop the pseudo-triggers."""
        found.sort(key=lambda f: (f[1] - f[2], f[1]))
        kept: list[tuple[Trigger, int, int]] = []
        for trig, start, end in found:
            if all(end <= s or start >= e for _, s, e in kept):
                kept.append((trig, start, end))
        kept.sort(key=lambda f: f[1])
        return [
            CueMatch(t, s, e, self._word_at(s), self._word_ending_at(e))
            for t, s, e in kept
            if t.cue is not Cue.PSEUDO
        ]

    @staticmethod
    def _any_between(positions: Sequence[int], lo: int, hi: int) -> bool:
        i = bisect.bisect_left(positions, lo)
        return i < len(positions) and positions[i] < hi

    def _blocked(self, cue: CueMatch, lo: int, hi: int) -> bool:
        """Does a non-weak trigger of the other cue stand between ``lo`` and ``hi``?"""
        return any(
            other.trigger.cue is not cue.trigger.cue
            and not other.trigger.weak
            and other.start >= lo
            and other.end <= hi
            for other in self.cues
        )

    def _covers(self, cue: CueMatch, start: int, end: int) -> bool:
        trig = cue.trigger
        if cue.end <= start and trig.direction is not Direction.BACKWARD:
            words = self._word_at(start) - cue.last_word
            return (
                (trig.forward is None or words <= trig.forward)
                and not self._any_between(self._breaks, cue.end, start)
                and (trig.forward is None or not self._any_between(self._commas, cue.end, start))
                and not self._blocked(cue, cue.end, start)
            )
        if cue.start >= end and trig.direction is not Direction.FORWARD:
            words = cue.first_word - self._word_ending_at(end)
            return (
                (trig.backward is None or words <= trig.backward)
                and not self._any_between(self._breaks, end, cue.start)
                and not self._any_between(self._commas, end, cue.start)
                and not self._blocked(cue, end, cue.start)
            )
        return False

    def label(self, start: int, end: int) -> tuple[Label, Trigger | None]:
        """The label of a mention at ``[start, end)`` and the trigger that set it."""
        covering = [c for c in self.cues if self._covers(c, start, end)]
        for cue, label in ((Cue.NEGATION, Label.NEGATIVE), (Cue.UNCERTAINTY, Label.UNCERTAIN)):
            hit = next((c for c in covering if c.trigger.cue is cue), None)
            if hit is not None:
                return label, hit.trigger
        return Label.POSITIVE, None
