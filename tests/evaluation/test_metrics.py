"""The evaluation's metric functions against values computed by hand (in the comments)."""

from __future__ import annotations

import math

import pytest

from models.concordance import UncertainPolicy
from models.evaluation.classification import PAPER_CLASSES, auroc, classification_metrics
from models.evaluation.common import Skipped
from models.evaluation.text_metrics import (
    corpus_bleu,
    mean_rouge_l,
    meteor,
    meteor_unavailable,
    text_metrics,
)
from models.evaluation.vqa import answers_match, normalize_answer, vqa_accuracy
from models.labeler import OBSERVATIONS, Label, Labels, Observation

P, N, U = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN


def labels(**given: Label) -> Labels:
    """All 14 observations, not mentioned unless given (by snake_case key)."""
    out = {o: Label.NOT_MENTIONED for o in OBSERVATIONS}
    out.update({Observation(k): v for k, v in given.items()})
    return out


# Four studies, generated (predicted) vs reference labels:
#   study 0: gen effusion P, edema U, consolidation P | ref effusion P, edema P, pneumonia P
#   study 1: gen effusion P, pneumonia U              | ref lung lesion P
#   study 2: gen nothing                              | ref effusion P, consolidation P
#   study 3: gen no finding P                         | ref no finding P
GENERATED = [
    labels(pleural_effusion=P, edema=U, consolidation=P),
    labels(pleural_effusion=P, pneumonia=U),
    labels(),
    labels(no_finding=P),
]
REFERENCE = [
    labels(pleural_effusion=P, edema=P, pneumonia=P),
    labels(lung_lesion=P),
    labels(pleural_effusion=P, consolidation=P),
    labels(no_finding=P),
]


def test_auroc_is_the_mann_whitney_statistic_with_ties() -> None:
    # positives score 0.9, 0.4, 0.2; negatives 0.1, 0.4. Of the 6 (pos, neg) pairs the
    # positive wins 0.9>0.1, 0.9>0.4, 0.4>0.1, 0.2>0.1, ties 0.4=0.4 (1/2), loses 0.2<0.4:
    # (4 + 0.5) / 6 = 0.75
    assert auroc([1, 0, 1, 0, 1], [0.9, 0.1, 0.4, 0.4, 0.2]) == pytest.approx(0.75, abs=1e-12)
    # binary scores: AUROC = (TPR + TNR) / 2 = (2/3 + 1/2) / 2
    assert auroc([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(7 / 12, abs=1e-12)
    assert auroc([1, 1], [0.2, 0.3]) is None and auroc([0, 0], [0.2, 0.3]) is None


def test_classification_metrics_u_ones_by_hand() -> None:
    r = classification_metrics(GENERATED, REFERENCE)  # U-ones: uncertain counts positive
    by = {c.key: c for c in r.classes}
    # class: gen / ref per study -> tp fp fn tn -> precision recall F1 AUROC
    # No Finding     0001 / 0001 -> 1 0 0 3 -> 1 1 1 1
    # Pneumothorax   0000 / 0000 -> 0 0 0 4 -> - - - -  (nothing to find: undefined)
    # Edema          1000 / 1000 -> 1 0 0 3 -> 1 1 1 1  (U counted as positive)
    # Effusion       1100 / 1010 -> 1 1 1 1 -> .5 .5 .5 .5
    # Cons/Pneumonia 1100 / 1010 -> 1 1 1 1 -> .5 .5 .5 .5  (either observation)
    # Lung Lesion    0000 / 0100 -> 0 0 1 3 -> - 0 0 .5
    expected = {
        "no_finding": (1, 0, 0, 3, 1.0, 1.0, 1.0, 1.0),
        "pneumothorax": (0, 0, 0, 4, None, None, None, None),
        "edema": (1, 0, 0, 3, 1.0, 1.0, 1.0, 1.0),
        "pleural_effusion": (1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5),
        "consolidation_pneumonia": (1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5),
        "lung_lesion": (0, 0, 1, 3, None, 0.0, 0.0, 0.5),
    }
    assert [c.key for c in r.classes] == list(expected)
    for key, (tp, fp, fn, tn, p, rec, f1, auc) in expected.items():
        c = by[key]
        assert (c.counts.tp, c.counts.fp, c.counts.fn, c.counts.tn) == (tp, fp, fn, tn), key
        for got, want in ((c.precision, p), (c.recall, rec), (c.f1, f1), (c.auroc, auc)):
            assert got == pytest.approx(want, abs=1e-6) if want is not None else got is None
    # micro: pooled tp 4, fp 2, fn 3, tn 15 -> P 4/6, R 4/7, F1 8/13,
    # AUROC (4/7 + 15/17) / 2 = 173/238
    assert r.micro.precision == pytest.approx(4 / 6, abs=1e-6)
    assert r.micro.recall == pytest.approx(4 / 7, abs=1e-6)
    assert r.micro.f1 == pytest.approx(8 / 13, abs=1e-6)
    assert r.micro.auroc == pytest.approx(173 / 238, abs=1e-6)
    # macro (Pneumothorax left out; Lung Lesion out of precision only):
    # F1 (1+1+.5+.5+0)/5, AUROC (1+1+.5+.5+.5)/5, precision (1+1+.5+.5)/4, recall 3/5
    assert r.macro.f1 == pytest.approx(0.6, abs=1e-6)
    assert r.macro.auroc == pytest.approx(0.7, abs=1e-6)
    assert r.macro.precision == pytest.approx(0.75, abs=1e-6)
    assert r.macro.recall == pytest.approx(0.6, abs=1e-6)
    # weighted by support (1, 0, 1, 2, 2, 1): F1 (1+1+1+1+0)/7, AUROC (1+1+1+1+.5)/7
    assert r.weighted.f1 == pytest.approx(4 / 7, abs=1e-6)
    assert r.weighted.auroc == pytest.approx(4.5 / 7, abs=1e-6)
    assert any("Pneumothorax" in n and "F1" in n for n in r.notes)
    assert r.policy is UncertainPolicy.U_ONES and r.n_studies == 4


def test_uncertain_policies() -> None:
    zeros = classification_metrics(GENERATED, REFERENCE, policy=UncertainPolicy.U_ZEROS)
    by = {c.key: c for c in zeros.classes}
    # Edema gen 0000 / ref 1000: a miss; Cons/Pna gen 1000 / ref 1010: tp 1, fn 1, tn 2
    assert by["edema"].counts.fn == 1 and by["edema"].f1 == 0.0
    assert by["consolidation_pneumonia"].precision == 1.0
    assert by["consolidation_pneumonia"].recall == 0.5
    ignore = classification_metrics(GENERATED, REFERENCE, policy=UncertainPolicy.U_IGNORE)
    by = {c.key: c for c in ignore.classes}
    # study 0 leaves Edema; study 1 leaves Cons/Pna (consolidation not mentioned, pneumonia U)
    assert (by["edema"].n, by["edema"].ignored) == (3, 1)
    assert by["edema"].auroc is None  # the remaining three are all negative
    assert (by["consolidation_pneumonia"].n, by["consolidation_pneumonia"].ignored) == (3, 1)
    # study 0 keeps Cons/Pna: its consolidation is positive, which decides the class
    assert by["consolidation_pneumonia"].counts.tp == 1


def test_paper_classes() -> None:
    assert [c.name for c in PAPER_CLASSES] == [
        "No Finding",
        "Pneumothorax",
        "Edema",
        "Pleural Effusion",
        "Consolidation/Pneumonia",
        "Lung Lesion",
    ]
    assert PAPER_CLASSES[4].observations == (Observation.CONSOLIDATION, Observation.PNEUMONIA)


HYPS = ["the heart size is normal", "no pleural effusion"]
REFS = ["the heart is normal in size", "no pleural effusion or pneumothorax"]


def test_corpus_bleu_by_hand() -> None:
    # n-gram matches over both studies: 1-grams 5/5 + 3/3 = 8/8; 2-grams ("the heart",
    # "is normal") 2/4 + 2/2 = 4/6; 3-grams 0/3 + 1/1 = 1/4; 4-grams 0/2 + 0/0 = 0/2.
    # Lengths 8 vs 11: brevity penalty exp(1 - 11/8).
    bp = math.exp(1 - 11 / 8)
    got = corpus_bleu(HYPS, REFS)
    assert got[1] == pytest.approx(bp, abs=1e-6)
    assert got[2] == pytest.approx(bp * math.sqrt(4 / 6), abs=1e-6)
    assert got[3] == pytest.approx(bp * (1 * 4 / 6 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert got[4] == 0.0  # no 4-gram matches; corpus BLEU is not smoothed


def test_rouge_l_by_hand() -> None:
    # LCS "the heart is normal" = 4 of 5 and 6 tokens: F = 2*4/(5+6) = 8/11;
    # "no pleural effusion" = 3 of 3 and 5: F = 6/8. Mean over studies.
    assert mean_rouge_l(HYPS, REFS) == pytest.approx((8 / 11 + 6 / 8) / 2, abs=1e-6)


def test_text_metrics_and_meteor() -> None:
    t = text_metrics([*HYPS, ""], [*REFS, "no acute process"], with_meteor=True)
    assert t.n == 3 and t.study_bleu4[2] == 0.0 and t.study_rouge_l[2] == 0.0
    assert t.rouge_l == pytest.approx((8 / 11 + 6 / 8 + 0) / 3, abs=1e-6)
    why = meteor_unavailable()
    if why is not None:
        assert isinstance(t.meteor, Skipped) and "pycocoevalcap" in why
        return
    # METEOR is what pycocoevalcap's jar says, its own corpus aggregate (not the mean of the
    # per-pair 0.4254, 0.3489, 0): the value of
    #   Meteor().compute_score({0: [REFS[0]], 1: [REFS[1]], 2: ["no acute process"]},
    #                          {0: [HYPS[0]], 1: [HYPS[1]], 2: [""]})[0]
    # with pycocoevalcap 1.2 (meteor-1.5.jar), pinned so that one Java start suffices
    assert isinstance(t.meteor, float) and t.meteor == pytest.approx(0.3048955289504205, abs=1e-9)
    off = text_metrics(HYPS, REFS, with_meteor=False)
    assert isinstance(off.meteor, Skipped) and "not requested" in off.meteor.reason


def test_meteor_reports_what_to_install_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no java on PATH
    got = meteor(HYPS, REFS)
    assert isinstance(got, Skipped)
    assert "default-jre-headless" in got.reason or "pycocoevalcap" in got.reason


def test_vqa_accuracy_by_hand() -> None:
    predictions = [
        "Yes, there is a small effusion.",  # closed "yes": first word yes -> right
        "no",  # closed "No." -> right
        "Nope",  # closed "no": synonym -> right
        "There is an effusion.",  # closed "yes": first word "there" -> wrong
        "The left lower lobe",  # open: articles dropped -> right
        "2.5 cm",  # open "2.5 cm." -> right (decimal kept, full stop dropped)
        "right lung",  # open "left lung" -> wrong
    ]
    references = ["yes", "No.", "no", "yes", "left lower lobe", "2.5 cm.", "left lung"]
    r = vqa_accuracy(predictions, references)
    # 5 of 7 right; closed 3 of 4; open 2 of 3
    assert (r.n, r.correct, r.n_closed, r.correct_closed) == (7, 5, 4, 3)
    assert r.accuracy == pytest.approx(5 / 7, abs=1e-9)
    assert r.closed_accuracy == pytest.approx(3 / 4, abs=1e-9)
    assert r.open_accuracy == pytest.approx(2 / 3, abs=1e-9)
    assert normalize_answer("  The Right_Lung!! ") == "right lung"
    assert normalize_answer("Correct.") == "yes" and not answers_match("", "yes")
