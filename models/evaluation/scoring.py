"""From per-study outputs (generated or given) to the evaluation's numbers.

:class:`StudyOutput` is what one selected manifest record produced: its reference report,
the generated report (or the failure's type), and its VQA answers. :func:`score` labels
both reports, computes every metric that applies and gives an :class:`EvaluationResult`
with the per-study scores, the summary in the paper's columns and the run's provenance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.concordance import UncertainPolicy
from models.evaluation.classification import (
    PAPER_CLASSES,
    ClassificationResult,
    EvalClass,
    binarize,
    classification_metrics,
)
from models.evaluation.common import Skipped
from models.evaluation.optional import chexbert_f1, radgraph_f1
from models.evaluation.text_metrics import TextMetrics, text_metrics
from models.evaluation.vqa import VQAResult, answers_match, vqa_accuracy
from models.labeler import ReportLabeler

__all__ = [
    "PAPER_COLUMNS",
    "EvaluationResult",
    "ScoreOptions",
    "ScoredStudy",
    "StudyOutput",
    "VQAItem",
    "score",
]

PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("auroc_micro", "AUROC micro"),
    ("auroc_macro", "AUROC macro"),
    ("auroc_weighted", "AUROC weighted"),
    ("f1_micro", "F1 micro"),
    ("f1_macro", "F1 macro"),
    ("f1_weighted", "F1 weighted"),
    ("bleu1", "BLEU-1"),
    ("bleu2", "BLEU-2"),
    ("bleu3", "BLEU-3"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
    ("meteor", "METEOR"),
    ("vqa_accuracy", "VQA accuracy"),
    ("fid", "FID"),
    ("chexbert_f1", "CheXbert-F1"),
    ("radgraph_f1", "RadGraph-F1"),
)
"""The summary's keys and column titles, in the order of ``results.md``."""


@dataclass(frozen=True)
class VQAItem:
    """One question of a study with its reference and the answer given."""

    question: str
    reference: str
    answer: str


@dataclass(frozen=True)
class StudyOutput:
    """What one selected record produced.

    ``generated`` is ``None`` when no report was generated for it (no reference report, the
    report task not run, or a failure, whose exception type is ``error``).
    """

    id: str
    view: str | None
    reference: str | None
    generated: str | None = None
    error: str | None = None
    vqa: tuple[VQAItem, ...] = ()


@dataclass(frozen=True)
class ScoredStudy:
    """A study's output with its binary labels per class and its text scores."""

    output: StudyOutput
    generated_labels: tuple[bool | None, ...] | None = None
    reference_labels: tuple[bool | None, ...] | None = None
    bleu4: float | None = None
    rouge_l: float | None = None
    vqa_correct: tuple[bool, ...] = ()


@dataclass(frozen=True)
class ScoreOptions:
    """How to score: labeler, uncertain policy, classes and the optional metrics."""

    labeler: ReportLabeler
    policy: UncertainPolicy = UncertainPolicy.U_ONES
    classes: tuple[EvalClass, ...] = PAPER_CLASSES
    with_meteor: bool = True
    chexbert_dir: Path | None = None
    radgraph_dir: Path | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class EvaluationResult:
    """Every metric (a number or :class:`Skipped`), the per-study scores and provenance."""

    meta: dict[str, Any]
    classes: tuple[EvalClass, ...]
    classification: ClassificationResult | Skipped
    text: TextMetrics | Skipped
    vqa: VQAResult | Skipped
    fid: float | Skipped
    chexbert_f1: float | Skipped
    radgraph_f1: float | Skipped
    studies: tuple[ScoredStudy, ...] = field(default=())

    @property
    def n_reports(self) -> int:
        """Studies scored on the report metrics."""
        return sum(1 for s in self.studies if s.bleu4 is not None)

    @property
    def n_failed(self) -> int:
        """Studies whose generation failed (left out of the metrics)."""
        return sum(1 for s in self.studies if s.output.error is not None)

    def summary(self) -> dict[str, float | Skipped | None]:
        """The paper's columns (:data:`PAPER_COLUMNS`): value, ``None`` or :class:`Skipped`."""
        out: dict[str, float | Skipped | None] = {}
        c = self.classification
        for avg in ("micro", "macro", "weighted"):
            for metric in ("auroc", "f1"):
                key = f"{metric}_{avg}"
                out[key] = c if isinstance(c, Skipped) else getattr(getattr(c, avg), metric)
        t = self.text
        for n in (1, 2, 3, 4):
            out[f"bleu{n}"] = t if isinstance(t, Skipped) else t.bleu[n]
        out["rouge_l"] = t if isinstance(t, Skipped) else t.rouge_l
        out["meteor"] = t if isinstance(t, Skipped) else t.meteor
        out["vqa_accuracy"] = self.vqa if isinstance(self.vqa, Skipped) else self.vqa.accuracy
        out["fid"] = self.fid
        out["chexbert_f1"] = self.chexbert_f1
        out["radgraph_f1"] = self.radgraph_f1
        return {k: out[k] for k, _ in PAPER_COLUMNS}

    def to_json(self) -> dict[str, Any]:
        """Aggregates and provenance only (no report text, no study ids)."""

        def plain(v: Any) -> Any:
            return str(v) if isinstance(v, Skipped) else v

        def section(v: Any) -> Any:
            return str(v) if isinstance(v, Skipped) else v.to_json()

        return {
            "meta": self.meta,
            "n_reports": self.n_reports,
            "n_failed": self.n_failed,
            "summary": {k: plain(v) for k, v in self.summary().items()},
            "classification": section(self.classification),
            "text": section(self.text),
            "vqa": section(self.vqa),
            "fid": plain(self.fid),
            "chexbert_f1": plain(self.chexbert_f1),
            "radgraph_f1": plain(self.radgraph_f1),
        }


def _report_metrics(
    pairs: Sequence[tuple[int, str, str]], opts: ScoreOptions
) -> tuple[Any, Any, Any, Any, dict[int, tuple[Any, ...]]]:
    """Classification, text, CheXbert and RadGraph results and per-study scores."""
    if not pairs:
        why = Skipped("no study with both a reference and a generated report")
        return why, why, why, why, {}
    hyps = [g for _, g, _ in pairs]
    refs = [r for _, _, r in pairs]
    gen_labels = opts.labeler.label_batch(hyps)
    ref_labels = opts.labeler.label_batch(refs)
    cls = classification_metrics(gen_labels, ref_labels, classes=opts.classes, policy=opts.policy)
    text = text_metrics(hyps, refs, with_meteor=opts.with_meteor)
    gen_bin = binarize(gen_labels, opts.classes, opts.policy)
    ref_bin = binarize(ref_labels, opts.classes, opts.policy)
    per = {
        idx: (tuple(gen_bin[k]), tuple(ref_bin[k]), text.study_bleu4[k], text.study_rouge_l[k])
        for k, (idx, _, _) in enumerate(pairs)
    }
    chexbert = chexbert_f1(hyps, refs, opts.chexbert_dir, device=opts.device)
    radgraph = radgraph_f1(hyps, refs, opts.radgraph_dir, device=opts.device)
    return cls, text, chexbert, radgraph, per


def score(
    outputs: Sequence[StudyOutput],
    opts: ScoreOptions,
    *,
    meta: Mapping[str, Any],
    fid: float | Skipped,
    report_skipped: Skipped | None = None,
    vqa_skipped: Skipped | None = None,
) -> EvaluationResult:
    """Score the outputs of the selected records (see the module docstring).

    Parameters
    ----------
    outputs
        One per selected record, in manifest order.
    opts
        Labeler, uncertain policy, classes and optional metrics.
    meta
        Provenance to store in ``results.json`` (model, manifest, selection).
    fid
        The FID computed by the caller (it needs the images), or why not.
    report_skipped, vqa_skipped
        Why the report or VQA task was not run, when it was not.
    """
    pairs = [
        (i, o.generated, o.reference)
        for i, o in enumerate(outputs)
        if o.generated is not None and o.reference is not None and o.error is None
    ]
    if report_skipped is not None:
        cls, text, chexbert, radgraph = (report_skipped,) * 4
        per: dict[int, tuple[Any, ...]] = {}
    else:
        cls, text, chexbert, radgraph, per = _report_metrics(pairs, opts)
    items = [(i, item) for i, o in enumerate(outputs) for item in o.vqa]
    hits = [answers_match(item.answer, item.reference) for _, item in items]
    vqa: VQAResult | Skipped
    if vqa_skipped is not None:
        vqa = vqa_skipped
    elif not items:
        vqa = Skipped("no VQA pair among the selected records")
    else:
        vqa = vqa_accuracy([it.answer for _, it in items], [it.reference for _, it in items])
    by_study: dict[int, list[bool]] = {}
    for (j, _), hit in zip(items, hits, strict=True):
        by_study.setdefault(j, []).append(hit)
    studies = []
    for i, o in enumerate(outputs):
        gen, ref, b4, rl = per.get(i, (None, None, None, None))
        studies.append(ScoredStudy(o, gen, ref, b4, rl, tuple(by_study.get(i, ()))))
    meta_out = {**meta, "labeler": opts.labeler.name, "uncertain_policy": opts.policy.value}
    return EvaluationResult(
        meta=meta_out,
        classes=tuple(opts.classes),
        classification=cls,
        text=text,
        vqa=vqa,
        fid=fid,
        chexbert_f1=chexbert,
        radgraph_f1=radgraph,
        studies=tuple(studies),
    )
