"""What the evaluation modules share: a metric that was not computed, and the error type.

A metric is either a number or :class:`Skipped` with the reason (what is missing and how to
get it), so that ``results.md`` can say ``skipped: reason`` instead of leaving a blank.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EvaluationError", "Skipped"]


class EvaluationError(ValueError):
    """An evaluation cannot run: bad input (manifest, predictions, images) or settings.

    Messages name lines and record numbers, never report text or patient identifiers.
    """


@dataclass(frozen=True)
class Skipped:
    """A metric that was not computed.

    Parameters
    ----------
    reason
        Why, in one sentence, with what to install or pass to compute it.
    """

    reason: str

    def __str__(self) -> str:
        return f"skipped: {self.reason}"
