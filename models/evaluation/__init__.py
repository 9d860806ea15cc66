"""``cxr-node evaluate`` (issue #28): LLM-CXR's evaluation on a dataset manifest.

Modules, one concept each (``docs/evaluation.md`` gives the protocol and definitions):

- :mod:`~models.evaluation.classification`: CheXpert-label precision, recall, F1, AUROC
  (per class; micro, macro, weighted) over LLM-CXR's six classes;
- :mod:`~models.evaluation.text_metrics`: BLEU-1..4, ROUGE-L, METEOR;
- :mod:`~models.evaluation.vqa`: VQA accuracy (normalised exact match);
- :mod:`~models.evaluation.fid`: FID with a site-supplied TorchScript feature extractor;
- :mod:`~models.evaluation.optional`: CheXbert-F1 and RadGraph-F1 from local weights;
- :mod:`~models.evaluation.predictions`: a predictions file (another system's reports);
- :mod:`~models.evaluation.generation`: the model's pass (reports, answers, images);
- :mod:`~models.evaluation.scoring`: per-study outputs -> :class:`EvaluationResult`;
- :mod:`~models.evaluation.outputs`: ``results.json``, ``results.md``, ``per_study.csv``;
- :mod:`~models.evaluation.run`: :func:`evaluate` (the model) and
  :func:`evaluate_predictions` (a predictions file).
"""

from __future__ import annotations

from models.evaluation.classification import (
    PAPER_CLASSES,
    ClassificationResult,
    EvalClass,
    auroc,
    classification_metrics,
)
from models.evaluation.common import EvaluationError, Skipped
from models.evaluation.fid import FeatureExtractor, fid, frechet_distance, load_extractor
from models.evaluation.predictions import read_predictions
from models.evaluation.run import (
    TASKS,
    evaluate,
    evaluate_predictions,
    load_gray8_pil,
    select_records,
)
from models.evaluation.scoring import EvaluationResult
from models.evaluation.text_metrics import text_metrics
from models.evaluation.vqa import vqa_accuracy

__all__ = [
    "PAPER_CLASSES",
    "TASKS",
    "ClassificationResult",
    "EvalClass",
    "EvaluationError",
    "EvaluationResult",
    "FeatureExtractor",
    "Skipped",
    "auroc",
    "classification_metrics",
    "evaluate",
    "evaluate_predictions",
    "fid",
    "frechet_distance",
    "load_extractor",
    "load_gray8_pil",
    "read_predictions",
    "select_records",
    "text_metrics",
    "vqa_accuracy",
]
