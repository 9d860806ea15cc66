"""CXR-VQA accuracy: exact match of normalised answers.

Normalisation (:func:`normalize_answer`)
    Lower-case; keep words and numbers (``[^\\W_]+`` runs and decimals such as ``2.5``),
    so punctuation and underscores become word breaks; drop the articles *a*, *an*, *the*;
    join with single spaces. An answer that is a single yes/no synonym becomes ``yes`` or
    ``no`` (:data:`YES`, :data:`NO`).

Matching (:func:`answers_match`)
    *Closed* questions, whose normalised reference is ``yes`` or ``no``: the prediction's
    first word, mapped through the synonyms, must equal it ("Yes, there is a small
    effusion." matches "yes"; "There is an effusion." does not). *Open* questions: the
    normalised strings must be equal.

Accuracy is the share of matched pairs; closed and open accuracies are reported beside it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["NO", "YES", "VQAResult", "answers_match", "normalize_answer", "vqa_accuracy"]

YES = frozenset({"yes", "yeah", "yep", "yup", "true", "correct", "affirmative"})
"""Answers read as ``yes``."""
NO = frozenset({"no", "nope", "nah", "false", "incorrect", "negative"})
"""Answers read as ``no``."""
_ARTICLES = frozenset({"a", "an", "the"})
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W_]+")


def _yes_no(word: str) -> str:
    if word in YES:
        return "yes"
    if word in NO:
        return "no"
    return word


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _ARTICLES]


def normalize_answer(text: str) -> str:
    """The normalised answer (see the module docstring)."""
    tokens = _tokens(text)
    if len(tokens) == 1:
        return _yes_no(tokens[0])
    return " ".join(tokens)


def answers_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` answers like ``reference`` (closed: first word; open: exact)."""
    ref = normalize_answer(reference)
    if ref in ("yes", "no"):
        tokens = _tokens(prediction)
        return bool(tokens) and _yes_no(tokens[0]) == ref
    return normalize_answer(prediction) == ref


@dataclass(frozen=True)
class VQAResult:
    """Matched answers over all pairs, and over closed (yes/no) and open questions."""

    n: int
    correct: int
    n_closed: int
    correct_closed: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def closed_accuracy(self) -> float | None:
        return self.correct_closed / self.n_closed if self.n_closed else None

    @property
    def open_accuracy(self) -> float | None:
        n_open = self.n - self.n_closed
        return (self.correct - self.correct_closed) / n_open if n_open else None

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "n_closed": self.n_closed,
            "closed_accuracy": self.closed_accuracy,
            "n_open": self.n - self.n_closed,
            "open_accuracy": self.open_accuracy,
        }


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str]) -> VQAResult:
    """Accuracy of ``predictions`` against ``references``, pair by pair."""
    if len(predictions) != len(references):
        raise ValueError(f"need paired answers, got {len(predictions)} and {len(references)}")
    hits = [answers_match(p, r) for p, r in zip(predictions, references, strict=True)]
    closed = [normalize_answer(r) in ("yes", "no") for r in references]
    return VQAResult(
        n=len(hits),
        correct=sum(hits),
        n_closed=sum(closed),
        correct_closed=sum(h and c for h, c in zip(hits, closed, strict=True)),
    )
