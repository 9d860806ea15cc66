"""Precomputed predictions: another system's (or an earlier run's) outputs to score.

A predictions file is JSON Lines, one study a line::

    {"id": "s50414267-02aa804e", "report": "FINDINGS: ... IMPRESSION: ...",
     "vqa": [{"question": "Is there a pleural effusion?", "answer": "no"}]}

``id`` is the manifest record's ``id``; ``report`` the generated report (a string, may be
empty); ``vqa`` (optional) the answers given, matched to the manifest's VQA pairs by the
question's exact text. Blank lines are skipped; other keys are ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.evaluation.common import EvaluationError
from models.jsonl import json_lines

__all__ = ["Prediction", "Predictions", "read_predictions"]


@dataclass(frozen=True)
class Prediction:
    """One study's generated report and VQA answers (``question -> answer``)."""

    id: str
    report: str
    answers: Mapping[str, str]
    line: int = 0
    """The line of the predictions file it came from."""


@dataclass(frozen=True)
class Predictions:
    """A read predictions file: predictions by id, and the sha256 of its bytes."""

    path: Path
    sha256: str
    by_id: Mapping[str, Prediction]


def _answers(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, list):
        raise EvaluationError(f"{where}: 'vqa' must be a list of {{question, answer}}")
    out: dict[str, str] = {}
    for i, item in enumerate(value):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("question"), str)
            and isinstance(item.get("answer"), str)
        ):
            raise EvaluationError(f"{where}: vqa[{i}] needs string 'question' and 'answer'")
        out[item["question"]] = item["answer"]
    return out


def _prediction(obj: Any, where: str, line: int) -> Prediction:
    if not isinstance(obj, dict):
        raise EvaluationError(f"{where}: a line must be a JSON object")
    pid, report = obj.get("id"), obj.get("report")
    if not isinstance(pid, str) or not pid.strip():
        raise EvaluationError(f"{where}: 'id' must be a non-empty string")
    if not isinstance(report, str):
        raise EvaluationError(f"{where}: 'report' must be a string")
    return Prediction(pid, report, _answers(obj.get("vqa"), where), line)


def read_predictions(path: Path | str) -> Predictions:
    """Read and validate a predictions file.

    Raises
    ------
    EvaluationError
        A malformed line (named by file and line number), a repeated id, or no line.
    OSError
        The file cannot be read.
    """
    path = Path(path)
    data = path.read_bytes()
    by_id: dict[str, Prediction] = {}
    for where, number, obj in json_lines(data, path, EvaluationError):
        pred = _prediction(obj, where, number)
        if pred.id in by_id:
            raise EvaluationError(f"{where}: the id of line {by_id[pred.id].line} repeats")
        by_id[pred.id] = pred
    if not by_id:
        raise EvaluationError(f"{path}: no predictions")
    return Predictions(path=path, sha256=hashlib.sha256(data).hexdigest(), by_id=by_id)
