"""Natural-language metrics of generated reports: BLEU-1..4, ROUGE-L, METEOR.

BLEU-n (corpus)
    sacrebleu's corpus BLEU (Papineni et al. 2002) with ``max_ngram_order=n`` and uniform
    weights: n-gram counts and lengths pooled over all studies, one brevity penalty for the
    corpus, no smoothing (``smooth_method="none"``), one reference per study. Tokenisation
    is sacrebleu's ``13a`` (the WMT ``mteval-v13a`` tokenizer: punctuation split from words)
    after lower-casing. On a 0-1 scale. pycocoevalcap's BLEU, used by many report
    generation papers, splits on white space only and adds 1e-9-sized epsilons to counts:
    the numbers differ slightly from it on punctuated text.
ROUGE-L
    rouge-score's ``rougeL`` F-measure (LCS-based; Porter-stemmed, its own lower-casing
    tokenizer) per study (:func:`models.concordance.rouge_l_f`), averaged over studies.
    pycocoevalcap's ROUGE-L weights recall with beta = 1.2; this is the F1 (beta = 1).
METEOR
    METEOR 1.5 (Denkowski & Lavie 2014) through pycocoevalcap's ``Meteor`` wrapper, which
    runs the ``meteor-1.5.jar`` bundled in that package with Java (``-l en -norm``: English,
    lower-cased and tokenised by METEOR itself). The corpus score is METEOR's own aggregate
    over the pooled statistics (not the mean of per-study scores). Skipped, with what to
    install, when pycocoevalcap or Java is missing.
Per study
    Sentence BLEU-4 (:func:`models.concordance.bleu4`: 13a, lower-cased, exponential
    smoothing, effective order) and ROUGE-L F, for ``per_study.csv``.

An empty generated report scores 0 for every metric of its study.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from models.concordance import bleu4, rouge_l_f
from models.evaluation.common import Skipped

__all__ = [
    "BLEU_TOKENIZE",
    "METEOR_INSTALL_HINT",
    "TextMetrics",
    "corpus_bleu",
    "mean_rouge_l",
    "meteor",
    "meteor_unavailable",
    "text_metrics",
]

BLEU_TOKENIZE = "13a"
METEOR_INSTALL_HINT = (
    "install Java and pycocoevalcap (apt-get install default-jre-headless; "
    'pip install -e ".[eval]", or scripts/setup.sh --peers)'
)
_WHITESPACE = re.compile(r"\s+")


@lru_cache(maxsize=4)
def _corpus_bleu_metric(order: int) -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(
        tokenize=BLEU_TOKENIZE,
        lowercase=True,
        smooth_method="none",
        max_ngram_order=order,
        effective_order=False,
    )


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"need paired texts, got {len(hyps)} and {len(refs)}")
    if not hyps:
        raise ValueError("need at least one pair of texts")


def corpus_bleu(
    hyps: Sequence[str], refs: Sequence[str], *, max_order: int = 4
) -> dict[int, float]:
    """Corpus BLEU-1 .. BLEU-``max_order`` on a 0-1 scale (see the module docstring)."""
    _check_pairs(hyps, refs)
    return {
        n: float(_corpus_bleu_metric(n).corpus_score(list(hyps), [list(refs)]).score) / 100.0
        for n in range(1, max_order + 1)
    }


def _study_scores(hyp: str, ref: str) -> tuple[float, float]:
    if not hyp.strip() or not ref.strip():
        return 0.0, 0.0
    return bleu4(hyp, ref), rouge_l_f(hyp, ref)


def mean_rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean over studies of the ROUGE-L F-measure (0-1)."""
    _check_pairs(hyps, refs)
    return statistics.fmean(_study_scores(h, r)[1] for h, r in zip(hyps, refs, strict=True))


def meteor_unavailable() -> str | None:
    """Why METEOR cannot be computed here (``None`` when it can)."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return f"pycocoevalcap is not installed: {METEOR_INSTALL_HINT}"
    if shutil.which("java") is None:
        return f"no Java runtime (java) on PATH: {METEOR_INSTALL_HINT}"
    return None


def _meteor_text(text: str) -> str:
    # one line per segment and no "|||" (the jar's field separator): else the stdio
    # protocol of the wrapper would read the wrong line or wait for ever
    return _WHITESPACE.sub(" ", text.replace("|||", " ")).strip()


def meteor(
    hyps: Sequence[str], refs: Sequence[str], *, timeout_s: float = 900.0
) -> float | Skipped:
    """Corpus METEOR (0-1) via pycocoevalcap and Java, or :class:`Skipped` with the reason.

    The METEOR process is killed if it has not answered within ``timeout_s`` seconds
    (reported as skipped).
    """
    _check_pairs(hyps, refs)
    reason = meteor_unavailable()
    if reason is not None:
        return Skipped(reason)
    try:
        scorer = _meteor_scorer()
    except OSError as exc:
        return Skipped(f"METEOR could not start Java ({type(exc).__name__}): {METEOR_INSTALL_HINT}")
    gts = {i: [_meteor_text(r)] for i, r in enumerate(refs)}
    res = {i: [_meteor_text(h)] for i, h in enumerate(hyps)}
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["score"] = float(scorer.compute_score(gts, res)[0])
        except Exception as exc:  # the jar died or answered garbage
            out["error"] = exc

    worker = threading.Thread(target=work, name="meteor", daemon=True)
    try:
        worker.start()
        worker.join(timeout_s)
    finally:
        _close(scorer.meteor_p)
    if worker.is_alive():
        return Skipped(f"METEOR did not finish within {timeout_s:.0f} s")
    if "error" in out:
        return Skipped(f"METEOR failed ({type(out['error']).__name__})")
    return float(out["score"])


def _meteor_scorer() -> Any:
    """pycocoevalcap's ``Meteor`` without its ``__del__``: that one takes the wrapper's lock,
    which stays held for ever when a score fails, so the process is closed here instead."""
    from pycocoevalcap.meteor.meteor import Meteor

    class _Meteor(Meteor):  # type: ignore[misc]
        def __del__(self) -> None:
            pass

    return _Meteor()


def _close(proc: Any) -> None:
    with contextlib.suppress(OSError):
        proc.stdin.close()
    proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@dataclass(frozen=True)
class TextMetrics:
    """Corpus text metrics and the per-study scores, in study order."""

    n: int
    bleu: dict[int, float]
    rouge_l: float
    meteor: float | Skipped
    study_bleu4: tuple[float, ...]
    study_rouge_l: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        out.update({f"bleu{n}": v for n, v in self.bleu.items()})
        out["rouge_l"] = self.rouge_l
        out["meteor"] = self.meteor if isinstance(self.meteor, float) else str(self.meteor)
        out["bleu_tokenize"] = BLEU_TOKENIZE
        return out


def text_metrics(
    hyps: Sequence[str],
    refs: Sequence[str],
    *,
    with_meteor: bool = True,
) -> TextMetrics:
    """BLEU-1..4, mean ROUGE-L, METEOR (unless ``with_meteor`` is false) and per-study scores.

    Parameters
    ----------
    hyps, refs
        Generated and reference reports, study by study (at least one pair).
    with_meteor
        Compute METEOR (starts a Java process, a few seconds); skipped otherwise.
    """
    _check_pairs(hyps, refs)
    per = [_study_scores(h, r) for h, r in zip(hyps, refs, strict=True)]
    return TextMetrics(
        n=len(hyps),
        bleu=corpus_bleu(hyps, refs),
        rouge_l=statistics.fmean(r for _, r in per),
        meteor=meteor(hyps, refs) if with_meteor else Skipped("METEOR not requested (--no-meteor)"),
        study_bleu4=tuple(b for b, _ in per),
        study_rouge_l=tuple(r for _, r in per),
    )
