"""A weight-free CheXpert-style report labeler (no model, no download, deterministic).

``label_report(text)`` gives each of the 14 CheXpert observations a :class:`Label`:
positive, negative, uncertain or not mentioned. Mentions come from the CheXpert labeler's
phrase lists (MIT, Stanford Machine Learning Group; package data in
``models/assets/chexpert``); negation and uncertainty come from NegEx/ConText-style trigger
rules written here (``docs/labeler.md`` says why no rule library is used, what the rules
are, and what a rule labeler cannot see).

Modules: :mod:`~models.labeler.observations` (the enums), :mod:`~models.labeler.base` (the
interface other labelers implement), :mod:`~models.labeler.sentences`,
:mod:`~models.labeler.phrases`, :mod:`~models.labeler.triggers` (the trigger lists, data),
:mod:`~models.labeler.context` (scopes), :mod:`~models.labeler.special_cases` and
:mod:`~models.labeler.rules` (the labeler and CheXpert's aggregation).
"""

from __future__ import annotations

from models.labeler.base import Labels, ReportLabeler
from models.labeler.observations import FINDINGS, OBSERVATIONS, Label, Observation
from models.labeler.rules import (
    Mention,
    RuleLabeler,
    aggregate,
    default_labeler,
    label_report,
    label_reports,
)

__all__ = [
    "FINDINGS",
    "OBSERVATIONS",
    "Label",
    "Labels",
    "Mention",
    "Observation",
    "ReportLabeler",
    "RuleLabeler",
    "aggregate",
    "default_labeler",
    "label_report",
    "label_reports",
]
