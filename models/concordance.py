"""Concordance of an AI draft with the radiologist's final report (issue #25).

Per pair (:func:`compare`): per-observation agreement of the two label sets, the
**significant discrepancy** flag, text overlap (BLEU-4, ROUGE-L F) and the turnaround from
draft to final. Over many pairs (:func:`summarize`, :func:`summarize_by` for a model version
or a time window): per observation the agreement rate, Cohen's kappa and the draft's
precision, recall and F1 with the final as reference, and micro and macro F1.

Definitions (``docs/labeler.md`` gives them with worked numbers):

- **Agreement** of one observation: the two 4-class labels are equal.
- **Binary view**: positive is the positive class; negative and not mentioned are not. How
  *uncertain* counts is a :class:`UncertainPolicy`: CheXpert's U-zeros (not positive,
  default for F1 and kappa), U-ones (positive) or U-ignore (the pair is left out of that
  observation's binary measures).
- **Cohen's kappa** ``(p_o - p_e) / (1 - p_e)``, ``p_o`` the observed agreement, ``p_e`` the
  agreement expected from the two sides' marginal frequencies. The binary kappa (under the
  policy) is the primary one; the 4-class kappa is reported beside it. ``None`` where
  ``p_e == 1`` (both sides gave one and the same class every time: undefined).
- **Precision** ``tp / (tp + fp)``, **recall** ``tp / (tp + fn)``, **F1**
  ``2 tp / (2 tp + fp + fn)``, the draft predicting and the final the truth; each ``None``
  where its denominator is 0. **Micro F1** pools the counts of the chosen observations,
  **macro F1** averages the observations whose F1 is defined.
- **Significant discrepancy**: a critical observation (:data:`DEFAULT_CRITICAL`,
  configurable) raised in one report and negative or not mentioned in the other, with its
  direction: *missed* (the final raises it, the draft does not) or *overcalled* (the draft
  raises it, the final does not). "Raised" counts uncertain as raised by default (U-ones):
  a hedged pneumothorax that the other report does not mention at all still deserves a
  look; pass another policy to change that.
- **BLEU-4**: sacrebleu's sentence BLEU, 13a tokenisation, lower-cased, exponential
  smoothing (``smooth_method="exp"``: a zero n-gram precision counts as
  ``1 / (2^k * total)`` for the k-th zero), effective order; on a 0-1 scale.
  **ROUGE-L F**: rouge-score's ``rougeL`` F-measure with the Porter stemmer (no data files).
  Both ``None`` when either text is missing or blank.
- **Turnaround**: seconds from the draft's time to the final's; negative when the final
  came first (the radiologist signed before the draft arrived).
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, TypeVar

from models.labeler import OBSERVATIONS, Label, Labels, Observation, ReportLabeler
from models.labeler import default_labeler as _default_labeler

K = TypeVar("K", bound=Hashable)


class UncertainPolicy(enum.Enum):
    """How an uncertain label counts in the binary (positive vs rest) measures."""

    U_ZEROS = "u_zeros"
    U_ONES = "u_ones"
    U_IGNORE = "u_ignore"

    def binary(self, label: Label) -> bool | None:
        """Is ``label`` positive under this policy (``None``: leave the pair out)?"""
        if label is not Label.UNCERTAIN:
            return label is Label.POSITIVE
        if self is UncertainPolicy.U_IGNORE:
            return None
        return self is UncertainPolicy.U_ONES


DEFAULT_CRITICAL: frozenset[Observation] = frozenset(
    {
        Observation.PNEUMOTHORAX,
        Observation.PLEURAL_EFFUSION,
        Observation.CONSOLIDATION,
        Observation.LUNG_LESION,
        Observation.FRACTURE,
        Observation.SUPPORT_DEVICES,
    }
)
"""Observations whose disagreement makes a pair a significant discrepancy."""


class DiscrepancyDirection(enum.Enum):
    """Which report raised the critical observation."""

    MISSED = "missed"
    """The final raises it; the draft is negative or silent."""
    OVERCALLED = "overcalled"
    """The draft raises it; the final is negative or silent."""


@dataclass(frozen=True)
class Discrepancy:
    """One critical observation on which the draft and the final disagree."""

    observation: Observation
    direction: DiscrepancyDirection
    draft: Label
    final: Label


@dataclass(frozen=True)
class TextOverlap:
    """BLEU-4 and ROUGE-L F of the draft against the final, each on a 0-1 scale."""

    bleu4: float
    rouge_l_f: float


@dataclass(frozen=True)
class PairConcordance:
    """One draft compared with its final report."""

    draft: Labels
    final: Labels
    agreement: dict[Observation, bool]
    discrepancies: tuple[Discrepancy, ...]
    text: TextOverlap | None = None
    turnaround_s: float | None = None
    model_version: str | None = None
    finalized_at: datetime | None = None

    @property
    def significant_discrepancy(self) -> bool:
        """Does any critical observation disagree (see :func:`find_discrepancies`)?"""
        return bool(self.discrepancies)

    @property
    def agreement_rate(self) -> float:
        """Share of the 14 observations with equal labels."""
        return sum(self.agreement.values()) / len(self.agreement)


def find_discrepancies(
    draft: Mapping[Observation, Label],
    final: Mapping[Observation, Label],
    *,
    critical: Iterable[Observation] = DEFAULT_CRITICAL,
    uncertain: UncertainPolicy = UncertainPolicy.U_ONES,
) -> tuple[Discrepancy, ...]:
    """The critical observations raised in one report and not in the other (CheXpert order).

    Under U-ignore an uncertain label on either side raises no discrepancy.
    """
    wanted = frozenset(critical)
    out = []
    for obs in OBSERVATIONS:
        if obs not in wanted:
            continue
        d, f = draft.get(obs, Label.NOT_MENTIONED), final.get(obs, Label.NOT_MENTIONED)
        in_draft, in_final = uncertain.binary(d), uncertain.binary(f)
        if in_draft is None or in_final is None or in_draft == in_final:
            continue
        direction = DiscrepancyDirection.OVERCALLED if in_draft else DiscrepancyDirection.MISSED
        out.append(Discrepancy(obs, direction, d, f))
    return tuple(out)


@lru_cache(maxsize=1)
def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="13a", lowercase=True, smooth_method="exp", effective_order=True)


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def bleu4(hypothesis: str, reference: str) -> float:
    """Sentence BLEU-4 of ``hypothesis`` against ``reference`` (0-1; see the module doc)."""
    return float(_bleu().sentence_score(hypothesis, [reference]).score) / 100.0


def rouge_l_f(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure of ``hypothesis`` against ``reference`` (0-1, Porter-stemmed)."""
    return float(_rouge().score(reference, hypothesis)["rougeL"].fmeasure)


def text_overlap(draft_text: str | None, final_text: str | None) -> TextOverlap | None:
    """BLEU-4 and ROUGE-L F of the draft against the final; ``None`` if either is blank."""
    if not draft_text or not final_text or not draft_text.strip() or not final_text.strip():
        return None
    return TextOverlap(bleu4(draft_text, final_text), rouge_l_f(draft_text, final_text))


def turnaround_seconds(drafted_at: datetime, finalized_at: datetime) -> float:
    """Seconds from draft to final (negative if the final came first).

    Both times must be time-zone aware, or both naive.
    """
    if (drafted_at.tzinfo is None) != (finalized_at.tzinfo is None):
        raise ValueError("turnaround needs two aware or two naive datetimes, not one of each")
    return (finalized_at - drafted_at).total_seconds()


def compare(
    draft: Mapping[Observation, Label],
    final: Mapping[Observation, Label],
    *,
    draft_text: str | None = None,
    final_text: str | None = None,
    drafted_at: datetime | None = None,
    finalized_at: datetime | None = None,
    model_version: str | None = None,
    critical: Iterable[Observation] = DEFAULT_CRITICAL,
    discrepancy_policy: UncertainPolicy = UncertainPolicy.U_ONES,
) -> PairConcordance:
    """Compare a draft's labels (and text, and time) with its final's."""
    d = {o: draft.get(o, Label.NOT_MENTIONED) for o in OBSERVATIONS}
    f = {o: final.get(o, Label.NOT_MENTIONED) for o in OBSERVATIONS}
    turnaround = None
    if drafted_at is not None and finalized_at is not None:
        turnaround = turnaround_seconds(drafted_at, finalized_at)
    return PairConcordance(
        draft=d,
        final=f,
        agreement={o: d[o] is f[o] for o in OBSERVATIONS},
        discrepancies=find_discrepancies(d, f, critical=critical, uncertain=discrepancy_policy),
        text=text_overlap(draft_text, final_text),
        turnaround_s=turnaround,
        model_version=model_version,
        finalized_at=finalized_at,
    )


def compare_reports(
    draft_text: str,
    final_text: str,
    *,
    labeler: ReportLabeler | None = None,
    drafted_at: datetime | None = None,
    finalized_at: datetime | None = None,
    model_version: str | None = None,
    critical: Iterable[Observation] = DEFAULT_CRITICAL,
    discrepancy_policy: UncertainPolicy = UncertainPolicy.U_ONES,
) -> PairConcordance:
    """Label both texts (with the rule labeler unless ``labeler`` is given) and compare."""
    lab = labeler if labeler is not None else _default_labeler()
    draft, final = lab.label_batch([draft_text, final_text])
    return compare(
        draft,
        final,
        draft_text=draft_text,
        final_text=final_text,
        drafted_at=drafted_at,
        finalized_at=finalized_at,
        model_version=model_version,
        critical=critical,
        discrepancy_policy=discrepancy_policy,
    )


# -- statistics ---------------------------------------------------------------------------


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two raters' labels for the same items (``None`` if undefined)."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs paired labels, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum(
        (sum(x == c for x in a) / n) * (sum(y == c for y in b) / n) for c in set(a) | set(b)
    )
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class BinaryCounts:
    """Confusion counts of the draft (prediction) against the final (reference)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: BinaryCounts) -> BinaryCounts:
        return BinaryCounts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


class CountScores:
    """Precision, recall and F1 of a result's ``counts`` (:class:`BinaryCounts`)."""

    counts: BinaryCounts

    @property
    def precision(self) -> float | None:
        return self.counts.precision

    @property
    def recall(self) -> float | None:
        return self.counts.recall

    @property
    def f1(self) -> float | None:
        return self.counts.f1


@dataclass(frozen=True)
class ObservationSummary(CountScores):
    """One observation over many pairs."""

    observation: Observation
    n: int
    """Pairs counted (all of them for the 4-class measures)."""
    agreement: float | None
    """Share of pairs with equal 4-class labels."""
    kappa: float | None
    """Binary kappa under the summary's uncertain policy (the primary kappa)."""
    kappa_4class: float | None
    counts: BinaryCounts
    """Binary counts under the policy; pairs the policy ignores are not in them."""
    ignored: int
    missed: int
    """Pairs with a significant discrepancy on this observation, final raises it."""
    overcalled: int
    """Pairs with a significant discrepancy on this observation, draft raises it."""


@dataclass(frozen=True)
class ConcordanceSummary:
    """Many pairs: per observation, pooled, text overlap and turnaround."""

    n_pairs: int
    uncertain_policy: UncertainPolicy
    per_observation: dict[Observation, ObservationSummary]
    micro: BinaryCounts
    """Counts pooled over the summary's observations (micro precision/recall/F1)."""
    macro_f1: float | None
    significant_discrepancies: int
    """Pairs with at least one significant discrepancy."""
    mean_bleu4: float | None
    mean_rouge_l_f: float | None
    n_text: int
    """Pairs with text overlap scores."""
    turnaround_mean_s: float | None
    turnaround_median_s: float | None

    @property
    def micro_f1(self) -> float | None:
        return self.micro.f1

    @property
    def significant_discrepancy_rate(self) -> float | None:
        return _ratio(self.significant_discrepancies, self.n_pairs)


def _observation_summary(
    obs: Observation, pairs: Sequence[PairConcordance], policy: UncertainPolicy
) -> ObservationSummary:
    drafts = [p.draft[obs] for p in pairs]
    finals = [p.final[obs] for p in pairs]
    binary = [(policy.binary(d), policy.binary(f)) for d, f in zip(drafts, finals, strict=True)]
    kept = [(d, f) for d, f in binary if d is not None and f is not None]
    counts = BinaryCounts(
        tp=sum(d and f for d, f in kept),
        fp=sum(d and not f for d, f in kept),
        fn=sum(f and not d for d, f in kept),
        tn=sum(not d and not f for d, f in kept),
    )
    directions = [x.direction for p in pairs for x in p.discrepancies if x.observation is obs]
    return ObservationSummary(
        observation=obs,
        n=len(pairs),
        agreement=_ratio(sum(d is f for d, f in zip(drafts, finals, strict=True)), len(pairs)),
        kappa=cohen_kappa([d for d, _ in kept], [f for _, f in kept]),
        kappa_4class=cohen_kappa(drafts, finals),
        counts=counts,
        ignored=len(binary) - len(kept),
        missed=directions.count(DiscrepancyDirection.MISSED),
        overcalled=directions.count(DiscrepancyDirection.OVERCALLED),
    )


def summarize(
    pairs: Iterable[PairConcordance],
    *,
    uncertain: UncertainPolicy = UncertainPolicy.U_ZEROS,
    observations: Sequence[Observation] = OBSERVATIONS,
) -> ConcordanceSummary:
    """Aggregate pairs; micro and macro F1 are over ``observations`` (default all 14)."""
    items = list(pairs)
    per = {o: _observation_summary(o, items, uncertain) for o in OBSERVATIONS}
    micro = sum((per[o].counts for o in observations), BinaryCounts())
    f1s = [f for o in observations if (f := per[o].f1) is not None]
    texts = [p.text for p in items if p.text is not None]
    turnarounds = [p.turnaround_s for p in items if p.turnaround_s is not None]
    return ConcordanceSummary(
        n_pairs=len(items),
        uncertain_policy=uncertain,
        per_observation=per,
        micro=micro,
        macro_f1=statistics.fmean(f1s) if f1s else None,
        significant_discrepancies=sum(p.significant_discrepancy for p in items),
        mean_bleu4=statistics.fmean(t.bleu4 for t in texts) if texts else None,
        mean_rouge_l_f=statistics.fmean(t.rouge_l_f for t in texts) if texts else None,
        n_text=len(texts),
        turnaround_mean_s=statistics.fmean(turnarounds) if turnarounds else None,
        turnaround_median_s=statistics.median(turnarounds) if turnarounds else None,
    )


def summarize_by(
    pairs: Iterable[PairConcordance],
    key: Callable[[PairConcordance], K],
    *,
    uncertain: UncertainPolicy = UncertainPolicy.U_ZEROS,
    observations: Sequence[Observation] = OBSERVATIONS,
) -> dict[K, ConcordanceSummary]:
    """:func:`summarize` per group, e.g. ``key=lambda p: (p.model_version, week(p))``."""
    groups: dict[K, list[PairConcordance]] = {}
    for pair in pairs:
        groups.setdefault(key(pair), []).append(pair)
    return {
        k: summarize(v, uncertain=uncertain, observations=observations) for k, v in groups.items()
    }


def window_start(t: datetime, width: timedelta) -> datetime:
    """The start of the ``width``-long window holding ``t``, windows counted from the Unix
    epoch (in UTC for an aware ``t``): a key for :func:`summarize_by`."""
    if width <= timedelta(0):
        raise ValueError("window width must be positive")
    epoch = datetime(1970, 1, 1, tzinfo=UTC if t.tzinfo is not None else None)
    return t - (t - epoch) % width
