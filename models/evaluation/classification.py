"""CheXpert-label metrics of generated reports against reference reports (LLM-CXR's table).

Both reports of a study are labelled by the same :class:`~models.labeler.ReportLabeler`;
the generated report's labels are the prediction, the reference report's the truth.

Classes (:data:`PAPER_CLASSES`, LLM-CXR's evaluation): No Finding, Pneumothorax, Edema,
Pleural Effusion, Consolidation/Pneumonia (one class, positive if either observation is)
and Lung Lesion.

Binary labels
    A label is positive or not under an :class:`~models.concordance.UncertainPolicy`:
    positive is positive; negative and not mentioned are not; *uncertain* is positive
    under U-ones (the default here: a hedged finding in a generated report counts as
    predicted, as in CheXpert's U-Ones policy), not positive under U-zeros, and under
    U-ignore the study is left out of that class (on either side). For the merged
    Consolidation/Pneumonia class: positive if either observation is positive under the
    policy; otherwise left out if either is ignored; otherwise not positive.

Precision, recall, F1
    ``tp / (tp + fp)``, ``tp / (tp + fn)``, ``2 tp / (2 tp + fp + fn)`` per class
    (:class:`~models.concordance.BinaryCounts`); ``None`` where the denominator is 0.

AUROC
    A generated report gives a hard 0/1 per class, not a score. AUROC is computed from
    those 0/1 scores by the Mann-Whitney formulation (:func:`auroc`), which for binary
    scores equals ``(sensitivity + specificity) / 2`` (balanced accuracy): the ROC curve
    has one operating point joined to (0, 0) and (1, 1). ``None`` where the reference
    has one value only (no positive or no negative study): AUROC is undefined there.

Averages (as scikit-learn's ``average=`` options)
    *micro*: the (study, class) pairs of all classes pooled into one binary problem
    (pooled counts for F1, precision, recall; one AUROC of the pooled 0/1 scores).
    *macro*: the unweighted mean of the classes where the metric is defined.
    *weighted*: the mean weighted by each class's support (reference positives), over the
    classes where the metric is defined. A class left out of an average is named in
    :attr:`ClassificationResult.notes` (scikit-learn would count an undefined F1 as 0;
    this module leaves it out, as ``models.concordance`` does for macro F1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from models.concordance import BinaryCounts, CountScores, UncertainPolicy
from models.labeler import Label, Labels, Observation

__all__ = [
    "PAPER_CLASSES",
    "Averages",
    "ClassResult",
    "ClassificationResult",
    "EvalClass",
    "auroc",
    "binarize",
    "classification_metrics",
]


@dataclass(frozen=True)
class EvalClass:
    """One evaluation class: one CheXpert observation or several merged (positive if any).

    Parameters
    ----------
    name
        Display name (``"Consolidation/Pneumonia"``).
    key
        Stable snake_case key, used in ``results.json`` and ``per_study.csv`` columns.
    observations
        The observations it covers.
    """

    name: str
    key: str
    observations: tuple[Observation, ...]

    def binary(self, labels: Mapping[Observation, Label], policy: UncertainPolicy) -> bool | None:
        """Is this class positive in ``labels`` under ``policy`` (``None``: left out)?"""
        values = [policy.binary(labels.get(o, Label.NOT_MENTIONED)) for o in self.observations]
        if any(v is True for v in values):
            return True
        if any(v is None for v in values):
            return None
        return False


_TITLES = {"precision": "precision", "recall": "recall", "f1": "F1", "auroc": "AUROC"}


def _single(obs: Observation) -> EvalClass:
    return EvalClass(obs.title, obs.value, (obs,))


PAPER_CLASSES: tuple[EvalClass, ...] = (
    _single(Observation.NO_FINDING),
    _single(Observation.PNEUMOTHORAX),
    _single(Observation.EDEMA),
    _single(Observation.PLEURAL_EFFUSION),
    EvalClass(
        "Consolidation/Pneumonia",
        "consolidation_pneumonia",
        (Observation.CONSOLIDATION, Observation.PNEUMONIA),
    ),
    _single(Observation.LUNG_LESION),
)
"""LLM-CXR's six evaluation classes, in the paper's order."""


def auroc(y_true: Sequence[int], y_score: Sequence[float]) -> float | None:
    """Area under the ROC curve by the Mann-Whitney U statistic.

    ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``, where ``R_pos`` is the sum
    of the ranks of the positive items among all scores (ties get their mean rank): the
    probability that a random positive scores above a random negative, ties counting one
    half (Hanley & McNeil, Radiology 1982). Equal to scikit-learn's ``roc_auc_score``.

    Returns
    -------
    float or None
        ``None`` when ``y_true`` has no positive or no negative item (undefined).
    """
    if len(y_true) != len(y_score):
        raise ValueError(f"AUROC needs paired values, got {len(y_true)} and {len(y_score)}")
    n_pos = sum(1 for t in y_true if t)
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(y_score)), key=lambda i: y_score[i])
    ranks = [0.0] * len(order)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and y_score[order[j + 1]] == y_score[order[i]]:
            j += 1
        mid = (i + j) / 2.0 + 1.0  # ranks are 1-based; ties share the mean rank
        for k in range(i, j + 1):
            ranks[order[k]] = mid
        i = j + 1
    r_pos = sum(r for r, t in zip(ranks, y_true, strict=True) if t)
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@dataclass(frozen=True)
class ClassResult(CountScores):
    """One class over the evaluated studies.

    ``n`` is the number of studies scored (those the policy left out are counted in
    ``ignored``); ``support`` the reference positives; ``predicted`` the generated ones.
    """

    name: str
    key: str
    n: int
    ignored: int
    counts: BinaryCounts
    auroc: float | None

    @property
    def support(self) -> int:
        return self.counts.tp + self.counts.fn

    @property
    def predicted(self) -> int:
        return self.counts.tp + self.counts.fp

    def to_json(self) -> dict[str, Any]:
        c = self.counts
        return {
            "name": self.name,
            "key": self.key,
            "n": self.n,
            "ignored": self.ignored,
            "support": self.support,
            "predicted": self.predicted,
            "tp": c.tp,
            "fp": c.fp,
            "fn": c.fn,
            "tn": c.tn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "auroc": self.auroc,
        }


@dataclass(frozen=True)
class Averages:
    """Precision, recall, F1 and AUROC under one averaging (micro, macro or weighted)."""

    precision: float | None
    recall: float | None
    f1: float | None
    auroc: float | None

    def to_json(self) -> dict[str, float | None]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "auroc": self.auroc,
        }


@dataclass(frozen=True)
class ClassificationResult:
    """Per-class results, the three averages, and notes on classes left out of averages."""

    policy: UncertainPolicy
    n_studies: int
    classes: tuple[ClassResult, ...]
    micro: Averages
    macro: Averages
    weighted: Averages
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "uncertain_policy": self.policy.value,
            "n_studies": self.n_studies,
            "classes": [c.to_json() for c in self.classes],
            "micro": self.micro.to_json(),
            "macro": self.macro.to_json(),
            "weighted": self.weighted.to_json(),
            "notes": list(self.notes),
        }


def binarize(
    labels: Sequence[Labels], classes: Sequence[EvalClass], policy: UncertainPolicy
) -> list[list[bool | None]]:
    """``[study][class]`` binary labels under ``policy`` (``None``: left out)."""
    return [[c.binary(lab, policy) for c in classes] for lab in labels]


def _class_result(cls: EvalClass, pairs: Sequence[tuple[bool | None, bool | None]]) -> ClassResult:
    kept = [(p, r) for p, r in pairs if p is not None and r is not None]
    counts = BinaryCounts(
        tp=sum(1 for p, r in kept if p and r),
        fp=sum(1 for p, r in kept if p and not r),
        fn=sum(1 for p, r in kept if r and not p),
        tn=sum(1 for p, r in kept if not p and not r),
    )
    score = auroc([r for _, r in kept], [float(p) for p, _ in kept])
    return ClassResult(cls.name, cls.key, len(kept), len(pairs) - len(kept), counts, score)


def _mean(
    results: Sequence[ClassResult], metric: str, *, weighted: bool
) -> tuple[float | None, list[str]]:
    """Mean of ``metric`` over the classes where it is defined; the names left out."""
    values = [(getattr(c, metric), c.support if weighted else 1) for c in results]
    left_out = [c.name for c, (v, _) in zip(results, values, strict=True) if v is None]
    defined = [(v, w) for v, w in values if v is not None]
    total = sum(w for _, w in defined)
    if not defined or total == 0:
        return None, left_out
    return sum(v * w for v, w in defined) / total, left_out


def classification_metrics(
    predicted: Sequence[Labels],
    reference: Sequence[Labels],
    *,
    classes: Sequence[EvalClass] = PAPER_CLASSES,
    policy: UncertainPolicy = UncertainPolicy.U_ONES,
) -> ClassificationResult:
    """Per-class and averaged precision, recall, F1 and AUROC (see the module docstring).

    Parameters
    ----------
    predicted, reference
        Labels of the generated and the reference reports, study by study.
    classes
        The evaluation classes (default: LLM-CXR's six).
    policy
        How an uncertain label counts (default U-ones: as positive).
    """
    if len(predicted) != len(reference):
        raise ValueError(f"need paired labels, got {len(predicted)} and {len(reference)}")
    pred = binarize(predicted, classes, policy)
    ref = binarize(reference, classes, policy)
    results = tuple(
        _class_result(c, [(p[k], r[k]) for p, r in zip(pred, ref, strict=True)])
        for k, c in enumerate(classes)
    )
    pooled = sum((c.counts for c in results), BinaryCounts())
    pooled_pairs = [
        (p[k], r[k])
        for p, r in zip(pred, ref, strict=True)
        for k in range(len(classes))
        if p[k] is not None and r[k] is not None
    ]
    micro = Averages(
        pooled.precision,
        pooled.recall,
        pooled.f1,
        auroc([bool(r) for _, r in pooled_pairs], [float(bool(p)) for p, _ in pooled_pairs]),
    )
    notes: list[str] = []
    averages = []
    for weighted in (False, True):
        values = {}
        for metric in ("precision", "recall", "f1", "auroc"):
            values[metric], left_out = _mean(results, metric, weighted=weighted)
            if left_out and not weighted:
                title = _TITLES[metric]
                notes.append(f"{title} undefined for {', '.join(left_out)}: left out of averages")
        averages.append(Averages(**values))
    return ClassificationResult(
        policy, len(predicted), results, micro, averages[0], averages[1], tuple(notes)
    )
