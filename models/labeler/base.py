"""The labeler interface: report text in, one :class:`Label` per CheXpert observation out.

The rule labeler implements it; concordance scoring and ``cxr-node evaluate`` take any
implementation, so a learned labeler can be swapped in without touching them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from models.labeler.observations import Label, Observation

Labels = dict[Observation, Label]
"""One label for each of the 14 observations, in CheXpert's order."""


@runtime_checkable
class ReportLabeler(Protocol):
    """Labels free-text reports; deterministic and offline."""

    name: str
    """The labeler and its rule version, stored with scores (e.g. ``"chexpert-rules/1"``)."""

    def label(self, text: str) -> Labels:
        """Label one report."""
        ...

    def label_batch(self, texts: Iterable[str]) -> list[Labels]:
        """Label many reports, in order."""
        ...
