"""Sentence splitting and length-preserving normalisation for the rule labeler.

A sentence ends at ``.``, ``!`` or ``?`` followed by white space (or the end of the text),
unless the word before the full stop is a known abbreviation (``vs.``, ``e.g.``, ``approx.``,
...). A blank line, and a line break before a list marker (``-``, ``*``, ``•``, ``1.``,
``2)``) or a section heading (``IMPRESSION:``), also end one. A single line break inside a
sentence does not: report text is often wrapped at a fixed width. A decimal point
(``1.5 cm``) never ends a sentence because no space follows it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

ABBREVIATIONS: frozenset[str] = frozenset(
    {"vs", "e.g", "i.e", "eg", "ie", "approx", "dr", "mr", "mrs", "ms", "st", "cf", "fig", "ca"}
)
"""Words whose full stop does not end a sentence (compared lower-case, without the stop)."""

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_BREAK = re.compile(r"\n[ \t]*\n|\n(?=[ \t]*(?:[-*•]|\d{1,2}[.)]\s|[A-Za-z][A-Za-z /]{0,40}:))")
_WORD_BEFORE = re.compile(r"([a-z.]+)$")


@dataclass(frozen=True)
class Sentence:
    """One sentence: its normalised text and where it starts in the report."""

    text: str
    start: int


def normalise(text: str) -> str:
    """Lower-case ``text`` without changing its length, so offsets stay valid.

    A character whose lower case is longer than one character (a few non-ASCII letters) is
    kept as it is.
    """
    return "".join(c if len(low := c.lower()) != 1 else low for c in text)


def split_sentences(text: str) -> list[Sentence]:
    """Split normalised report text into sentences (empty ones are dropped)."""
    cuts = {0, len(text)}
    for m in _SENTENCE_END.finditer(text):
        word = _WORD_BEFORE.search(text, 0, m.start())
        if m.group() == "." and word and word.group(1).strip(".") in ABBREVIATIONS:
            continue
        cuts.add(m.end())
    cuts.update(m.start() + 1 for m in _BREAK.finditer(text))
    bounds = sorted(cuts)
    sentences = []
    for start, end in itertools.pairwise(bounds):
        chunk = text[start:end]
        stripped = chunk.strip()
        if stripped:
            sentences.append(Sentence(stripped, start + chunk.index(stripped[0])))
    return sentences
