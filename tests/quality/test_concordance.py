"""Concordance arithmetic against values computed by hand (the working is in the comments)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from models.concordance import (
    DEFAULT_CRITICAL,
    BinaryCounts,
    DiscrepancyDirection,
    PairConcordance,
    UncertainPolicy,
    bleu4,
    cohen_kappa,
    compare,
    compare_reports,
    find_discrepancies,
    rouge_l_f,
    summarize,
    summarize_by,
    text_overlap,
    turnaround_seconds,
    window_start,
)
from models.labeler import OBSERVATIONS, Label, Observation

P, N, U, NM = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN, Label.NOT_MENTIONED
PX = Observation.PNEUMOTHORAX
PE = Observation.PLEURAL_EFFUSION
CM = Observation.CARDIOMEGALY
MISSED, OVERCALLED = DiscrepancyDirection.MISSED, DiscrepancyDirection.OVERCALLED

# Eight draft/final pairs. Pneumothorax varies; pleural effusion agrees (positive in pairs
# 1-4, negative in 5-8); every other observation is not mentioned on either side.
#
#   pair   1   2   3   4   5   6   7   8
#   draft  P   P   N   NM  U   NM  N   U
#   final  P   N   N   N   P   P   NM  U
PX_TABLE = [(P, P), (P, N), (N, N), (NM, N), (U, P), (NM, P), (N, NM), (U, U)]


def _pairs() -> list[PairConcordance]:
    out = []
    for i, (d, f) in enumerate(PX_TABLE):
        effusion = P if i < 4 else N
        out.append(compare({PX: d, PE: effusion}, {PX: f, PE: effusion}))
    return out


def test_pair_agreement_and_discrepancy_flags() -> None:
    pairs = _pairs()
    # 4-class equality: pairs 1, 3 and 8 agree on pneumothorax
    assert [p.agreement[PX] for p in pairs] == [
        True,
        False,
        True,
        False,
        False,
        False,
        False,
        True,
    ]
    # pair 2 disagrees on 1 of 14 observations
    assert pairs[1].agreement_rate == pytest.approx(13 / 14)
    # uncertain counts as raised (U-ones): pair 2 overcalls, pair 6 misses; pair 5 (U vs P)
    # and pair 4 (NM vs N: neither raises it) are no discrepancy
    flags = [[(x.observation, x.direction) for x in p.discrepancies] for p in pairs]
    assert flags == [[], [(PX, OVERCALLED)], [], [], [], [(PX, MISSED)], [], []]
    assert [p.significant_discrepancy for p in pairs].count(True) == 2
    assert pairs[5].discrepancies[0].draft is NM and pairs[5].discrepancies[0].final is P


@pytest.mark.parametrize(
    ("policy", "draft", "final", "expected"),
    [
        (UncertainPolicy.U_ONES, U, N, [(PX, OVERCALLED)]),
        (UncertainPolicy.U_ONES, NM, U, [(PX, MISSED)]),
        (UncertainPolicy.U_ONES, U, P, []),
        (UncertainPolicy.U_ZEROS, U, P, [(PX, MISSED)]),
        (UncertainPolicy.U_ZEROS, U, N, []),
        (UncertainPolicy.U_IGNORE, U, P, []),
        (UncertainPolicy.U_IGNORE, P, N, [(PX, OVERCALLED)]),
    ],
)
def test_discrepancy_direction_under_each_policy(
    policy: UncertainPolicy, draft: Label, final: Label, expected: list[tuple[Observation, object]]
) -> None:
    got = find_discrepancies({PX: draft}, {PX: final}, uncertain=policy)
    assert [(x.observation, x.direction) for x in got] == expected


def test_the_critical_set_is_configurable() -> None:
    draft = {CM: P, PX: N, Observation.FRACTURE: P}
    final = {CM: N, PX: P, Observation.FRACTURE: NM}
    assert CM not in DEFAULT_CRITICAL
    default = compare(draft, final).discrepancies
    assert [(x.observation, x.direction) for x in default] == [
        (PX, MISSED),
        (Observation.FRACTURE, OVERCALLED),
    ]
    only_heart = compare(draft, final, critical={CM}).discrepancies
    assert [(x.observation, x.direction) for x in only_heart] == [(CM, OVERCALLED)]
    assert compare(draft, final, critical=()).significant_discrepancy is False


def test_summary_u_zeros_by_hand() -> None:
    s = summarize(_pairs(), uncertain=UncertainPolicy.U_ZEROS)
    px = s.per_observation[PX]
    # 4-class agreement 3/8. 4-class kappa: draft marginals P,N,NM,U = 2,2,2,2 (/8), final
    # P,N,NM,U = 3,3,1,1 (/8); p_e = .25*(3+3+1+1)/8 = .25; kappa = (.375-.25)/.75 = 1/6
    assert px.agreement == pytest.approx(3 / 8)
    assert px.kappa_4class == pytest.approx(1 / 6)
    # binary, U as 0: draft pos = 1,2; final pos = 1,5,6 -> tp 1 (1), fp 1 (2), fn 2 (5,6),
    # tn 4. precision 1/2, recall 1/3, F1 2/(2+1+2) = .4. p_o = 5/8; p_e = .25*.375 +
    # .75*.625 = .5625; kappa = (.625-.5625)/.4375 = 1/7
    assert px.counts == BinaryCounts(tp=1, fp=1, fn=2, tn=4)
    assert (px.precision, px.recall, px.f1) == pytest.approx((1 / 2, 1 / 3, 0.4))
    assert px.kappa == pytest.approx(1 / 7)
    assert (px.missed, px.overcalled, px.ignored, px.n) == (1, 1, 0, 8)
    # effusion agrees everywhere: tp 4, tn 4, kappa 1, F1 1
    pe = s.per_observation[PE]
    assert (pe.counts, pe.kappa, pe.f1, pe.agreement) == (BinaryCounts(4, 0, 0, 4), 1.0, 1.0, 1.0)
    # the other 12: nothing on either side -> agreement 1, kappa and F1 undefined
    cm = s.per_observation[CM]
    assert (cm.agreement, cm.kappa, cm.kappa_4class, cm.f1, cm.precision) == (
        1.0,
        None,
        None,
        None,
        None,
    )
    # micro: tp 1+4, fp 1, fn 2 -> F1 10/13; macro over the defined F1s: (.4 + 1)/2
    assert s.micro == BinaryCounts(tp=5, fp=1, fn=2, tn=8 + 12 * 8)
    assert s.micro_f1 == pytest.approx(10 / 13)
    assert s.macro_f1 == pytest.approx(0.7)
    assert (s.n_pairs, s.significant_discrepancies) == (8, 2)
    assert s.significant_discrepancy_rate == pytest.approx(0.25)


def test_summary_u_ones_and_u_ignore_by_hand() -> None:
    ones = summarize(_pairs(), uncertain=UncertainPolicy.U_ONES).per_observation[PX]
    # U as 1: draft pos 1,2,5,8; final pos 1,5,6,8 -> tp 3, fp 1, fn 1, tn 3; P = R = F1 =
    # .75; p_o = 6/8, p_e = .5*.5+.5*.5 = .5, kappa = .25/.5 = .5
    assert ones.counts == BinaryCounts(tp=3, fp=1, fn=1, tn=3)
    assert (ones.precision, ones.recall, ones.f1, ones.kappa) == pytest.approx(
        (0.75, 0.75, 0.75, 0.5)
    )
    ignore = summarize(_pairs(), uncertain=UncertainPolicy.U_IGNORE).per_observation[PX]
    # pairs 5 and 8 left out: draft pos 1,2 of {1,2,3,4,6,7}; final pos 1,6 -> tp 1, fp 1,
    # fn 1, tn 3; F1 .5; p_o 4/6, p_e (1/3)^2 + (2/3)^2 = 5/9, kappa (6/9-5/9)/(4/9) = .25
    assert (ignore.counts, ignore.ignored) == (BinaryCounts(tp=1, fp=1, fn=1, tn=3), 2)
    assert (ignore.f1, ignore.kappa) == pytest.approx((0.5, 0.25))
    # the 4-class measures do not depend on the policy
    assert ignore.kappa_4class == pytest.approx(1 / 6)


def test_micro_and_macro_over_chosen_observations() -> None:
    s = summarize(_pairs(), observations=[PX])
    assert s.micro == BinaryCounts(tp=1, fp=1, fn=2, tn=4)
    assert s.macro_f1 == pytest.approx(0.4)


def test_kappa_edge_cases() -> None:
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])


def test_kappa_matches_sklearn_if_installed() -> None:
    a = [P, P, N, NM, U, NM, N, U, P, N]
    b = [P, N, N, N, P, P, NM, U, P, U]
    mine = cohen_kappa(a, b)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert mine == pytest.approx(
        sklearn_metrics.cohen_kappa_score([x.value for x in a], [x.value for x in b])
    )


def test_binary_counts_undefined_ratios() -> None:
    assert BinaryCounts(tn=5).f1 is None
    assert BinaryCounts(fp=2).precision == 0.0 and BinaryCounts(fp=2).recall is None
    assert BinaryCounts(fp=2).f1 == 0.0
    assert BinaryCounts(1, 2, 3, 4) + BinaryCounts(1, 1, 1, 1) == BinaryCounts(2, 3, 4, 5)


def test_bleu_and_rouge_identical_disjoint_and_by_hand() -> None:
    same = "Small left pleural effusion. No pneumothorax."
    assert bleu4(same, same) == pytest.approx(1.0)
    assert rouge_l_f(same, same) == pytest.approx(1.0)
    assert bleu4("cardiomegaly", "no pneumothorax") == 0.0
    assert rouge_l_f("cardiomegaly", "no pneumothorax") == 0.0
    # every n-gram of the 4-word hypothesis matches; brevity penalty exp(1 - 6/4)
    assert bleu4("the heart is normal", "the heart is normal in size") == pytest.approx(
        math.exp(-0.5)
    )
    # 1..4-gram precisions 3/4, 2/3, 1/2, 0/1; exp smoothing makes the zero 1/(2*1);
    # BP 1 -> (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.125 ** 0.25
    assert bleu4("the heart is normal", "the heart is enlarged") == pytest.approx(0.125**0.25)
    # LCS "small pleural effusion" = 3 of 4 words each side -> P = R = F = .75
    assert rouge_l_f("small left pleural effusion", "small right pleural effusion") == 0.75
    # LCS 2; P = 2/2, R = 2/4, F = 2PR/(P+R) = 2/3; the Porter stemmer equates the plural
    assert rouge_l_f("no effusions", "no pneumothorax or effusion") == pytest.approx(2 / 3)


def test_text_overlap_needs_both_texts() -> None:
    assert text_overlap(None, "x") is None
    assert text_overlap("x", "   ") is None
    t = text_overlap("No pneumothorax.", "No pneumothorax.")
    assert t is not None and (t.bleu4, t.rouge_l_f) == pytest.approx((1.0, 1.0))


def test_turnaround_and_its_aggregate() -> None:
    t0 = datetime(2026, 3, 4, 8, 0, tzinfo=UTC)
    assert turnaround_seconds(t0, t0 + timedelta(minutes=10)) == 600.0
    assert turnaround_seconds(t0, t0 - timedelta(minutes=2)) == -120.0
    with pytest.raises(ValueError):
        turnaround_seconds(t0, datetime(2026, 3, 4, 9, 0))
    pairs = [
        compare({}, {}, drafted_at=t0, finalized_at=t0 + timedelta(seconds=s))
        for s in (600, 3600, -120)
    ]
    pairs.append(compare({}, {}))  # no times: left out of the turnaround figures
    s = summarize(pairs)
    # mean (600 + 3600 - 120) / 3 = 1360; median 600
    assert (s.turnaround_mean_s, s.turnaround_median_s) == pytest.approx((1360.0, 600.0))
    assert s.n_text == 0 and s.mean_bleu4 is None


def test_text_means_over_pairs_with_text() -> None:
    pairs = [
        compare({}, {}, draft_text="no pneumothorax", final_text="no pneumothorax"),
        compare({}, {}, draft_text="cardiomegaly", final_text="no pneumothorax"),
        compare({}, {}),
    ]
    s = summarize(pairs)
    assert s.n_text == 2
    assert (s.mean_bleu4, s.mean_rouge_l_f) == pytest.approx((0.5, 0.5))


def test_groups_by_model_version_and_window() -> None:
    t0 = datetime(2026, 3, 4, 13, 37, tzinfo=UTC)
    assert window_start(t0, timedelta(days=1)) == datetime(2026, 3, 4, tzinfo=UTC)
    assert window_start(t0, timedelta(hours=1)) == datetime(2026, 3, 4, 13, tzinfo=UTC)
    week = window_start(t0, timedelta(days=7))
    # windows count from 1970-01-01, a Thursday
    assert week.weekday() == 3 and timedelta(0) <= t0 - week < timedelta(days=7)
    with pytest.raises(ValueError):
        window_start(t0, timedelta(0))
    pairs = [
        compare({PX: P}, {PX: P}, model_version="a", finalized_at=t0),
        compare({PX: P}, {PX: N}, model_version="a", finalized_at=t0 + timedelta(days=1)),
        compare({PX: N}, {PX: P}, model_version="b", finalized_at=t0),
    ]

    def key(p: PairConcordance) -> tuple[str | None, datetime]:
        assert p.finalized_at is not None
        return p.model_version, window_start(p.finalized_at, timedelta(days=1))

    groups = summarize_by(pairs, key)
    day = datetime(2026, 3, 4, tzinfo=UTC)
    assert sorted(groups, key=str) == [("a", day), ("a", day + timedelta(days=1)), ("b", day)]
    assert groups[("a", day)].per_observation[PX].f1 == 1.0
    assert groups[("a", day + timedelta(days=1))].per_observation[PX].counts.fp == 1
    assert groups[("b", day)].per_observation[PX].missed == 1


def test_compare_reports_labels_both_texts() -> None:
    draft = "No pneumothorax. Small left pleural effusion."
    final = "Small left apical pneumothorax. Small left pleural effusion."
    pair = compare_reports(draft, final)
    assert (pair.draft[PX], pair.final[PX]) == (N, P)
    assert pair.agreement[PE] and not pair.agreement[PX]
    assert [(x.observation, x.direction) for x in pair.discrepancies] == [(PX, MISSED)]
    assert pair.text is not None and 0.0 < pair.text.bleu4 < 1.0
    assert set(pair.draft) == set(OBSERVATIONS)
