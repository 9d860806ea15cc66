"""The rule labeler on written sentences: mention, negation, uncertainty, several findings in
one sentence, normal reports, the No Finding rule, unmentions and CheXpert's special cases.

Each case gives every label the report should carry other than ``not_mentioned``; the check
is exact, so a stray mention fails a case as surely as a wrong label.
"""

from __future__ import annotations

import logging

import pytest

from models.labeler import (
    OBSERVATIONS,
    Label,
    Observation,
    ReportLabeler,
    RuleLabeler,
    default_labeler,
    label_report,
    label_reports,
)
from models.labeler.special_cases import STATEMENTS, Statement
from tests.helpers import REPO

P, N, U = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN
NF = Observation.NO_FINDING
EC = Observation.ENLARGED_CARDIOMEDIASTINUM
CM = Observation.CARDIOMEGALY
OP = Observation.LUNG_OPACITY
LE = Observation.LUNG_LESION
ED = Observation.EDEMA
CO = Observation.CONSOLIDATION
PN = Observation.PNEUMONIA
AT = Observation.ATELECTASIS
PX = Observation.PNEUMOTHORAX
PE = Observation.PLEURAL_EFFUSION
PO = Observation.PLEURAL_OTHER
FR = Observation.FRACTURE
SD = Observation.SUPPORT_DEVICES


def check(text: str, expected: dict[Observation, Label]) -> None:
    got = label_report(text)
    assert list(got) == list(OBSERVATIONS)
    mentioned = {o: lab for o, lab in got.items() if lab is not Label.NOT_MENTIONED}
    assert mentioned == expected, text


# (text, labels other than not_mentioned), per observation: mention, negation, uncertainty,
# and the unmention or special case where the observation has one
PER_OBSERVATION: dict[Observation, list[tuple[str, dict[Observation, Label]]]] = {
    EC: [
        ("The mediastinum is widened.", {EC: P}),
        ("The cardiomediastinal silhouette is unremarkable.", {EC: N, NF: P}),
        ("Mediastinum is not widened.", {EC: N, NF: P}),
        ("Possible mediastinal widening.", {EC: U}),
        ("Stable cardiomediastinal silhouette.", {EC: U}),
        ("Catheter tip in the superior mediastinum.", {SD: P, NF: P}),
    ],
    CM: [
        ("Moderate cardiomegaly.", {CM: P}),
        ("The heart is enlarged.", {CM: P}),
        ("Heart is moderately enlarged.", {CM: P}),
        ("No cardiomegaly.", {CM: N, NF: P}),
        ("Heart size is normal.", {CM: N, NF: P}),
        ("Normal heart size.", {CM: N, NF: P}),
        ("Borderline cardiomegaly.", {CM: U}),
        ("Heart size is stable.", {CM: U}),
        ("Pacemaker leads project over the heart.", {SD: P, NF: P}),
        ("Findings consistent with CHF.", {ED: P, CM: U}),
    ],
    OP: [
        ("Patchy opacity in the left lower lobe.", {OP: P}),
        ("No focal airspace opacity.", {OP: N, NF: P}),
        ("Possible infiltrate in the right upper lobe.", {OP: U}),
        ("Pleural scar at the left apex.", {PO: P}),
    ],
    LE: [
        ("Spiculated mass in the right upper lobe.", {LE: P}),
        ("No suspicious pulmonary nodule.", {LE: N, NF: P}),
        ("Cannot exclude a small nodule.", {LE: U}),
        ("A 1.5 cm nodule in the left lung.", {LE: P}),
        # "calcified nodul" is an unmention; "calcifi" one of CheXpert's other findings
        ("Calcified nodule in the right upper lobe.", {}),
        ("Massive left pleural effusion.", {PE: P}),
    ],
    ED: [
        ("Mild pulmonary edema.", {ED: P}),
        ("No pulmonary edema.", {ED: N, NF: P}),
        ("Interstitial edema is likely.", {ED: U}),
        ("Edema may be present.", {ED: U}),
        ("Mild pulmonary vascular congestion.", {ED: U}),
    ],
    CO: [
        ("Right lower lobe consolidation.", {CO: P}),
        ("No focal consolidation.", {CO: N, NF: P}),
        ("Consolidation versus atelectasis at the left base.", {CO: U, AT: U}),
    ],
    PN: [
        ("Right lower lobe pneumonia.", {PN: P}),
        ("No evidence of pneumonia.", {PN: N, NF: P}),
        ("Findings are concerning for pneumonia.", {PN: U}),
        ("Opacity may represent infection.", {OP: P, PN: U}),
    ],
    AT: [
        ("Bibasilar atelectasis.", {AT: P}),
        ("Atelectasis has resolved.", {AT: N, NF: P}),
        ("Findings may represent atelectasis.", {AT: U}),
        ("Left lower lobe collapse.", {AT: P}),
        ("Plate-like atelectasis at the left base.", {AT: P}),
    ],
    PX: [
        ("Small right apical pneumothorax.", {PX: P}),
        ("No pneumothorax.", {PX: N, NF: P}),
        ("Small pneumothorax cannot be excluded.", {PX: U}),
        ("Right hydropneumothorax.", {PX: P}),
        ("Visceral pleural line consistent with a small apical pneumothorax.", {PX: P}),
    ],
    PE: [
        ("Small bilateral pleural effusions.", {PE: P}),
        ("Without evidence of effusion.", {PE: N, NF: P}),
        ("Possible small left pleural effusion.", {PE: U}),
        # "pericardial effusion" is CheXpert's unmention for Pleural Effusion (and no other
        # observation, so the report is No Finding: see docs/labeler.md, known limits)
        ("Small pericardial effusion.", {NF: P}),
        ("Blunting of the costophrenic angle, possibly a small effusion.", {PE: U}),
    ],
    PO: [
        ("Pleural thickening at the right apex.", {PO: P}),
        ("No pleural thickening.", {PO: N, NF: P}),
        ("Possible pleural thickening versus small effusion.", {PO: U, PE: U}),
    ],
    FR: [
        ("Displaced fracture of the right fifth rib.", {FR: P}),
        ("No acute fracture.", {FR: N, NF: P}),
        ("Possible nondisplaced rib fracture.", {FR: U}),
        ("Old healed left rib fractures.", {FR: P}),
    ],
    SD: [
        ("Endotracheal tube terminates 4 cm above the carina.", {SD: P, NF: P}),
        ("Endotracheal tube in normal position.", {SD: P, NF: P}),
        ("Interval removal of the nasogastric tube.", {SD: N, NF: P}),
        ("The right PICC line has been removed.", {SD: N, NF: P}),
        ("Kerley B lines suggesting interstitial edema.", {ED: U}),
        ("Chest drain in the right pleural space.", {SD: P, NF: P}),
        # "drain_" is a whole word in CheXpert's list: "drainage" is no device
        ("Postural drainage was recommended.", {NF: P}),
        ("Possible retained catheter fragment.", {SD: U, NF: P}),
    ],
}

PER_OBSERVATION_CASES = [
    pytest.param(text, expected, id=f"{obs.value}:{i}")
    for obs, cases in PER_OBSERVATION.items()
    for i, (text, expected) in enumerate(cases)
]


@pytest.mark.parametrize(("text", "expected"), PER_OBSERVATION_CASES)
def test_each_observation(text: str, expected: dict[Observation, Label]) -> None:
    check(text, expected)


def test_every_finding_has_a_mention_a_negation_and_an_uncertainty_case() -> None:
    for obs, cases in PER_OBSERVATION.items():
        seen = {expected.get(obs) for _, expected in cases}
        assert {P, N, U} <= seen, obs


@pytest.mark.parametrize(
    "text",
    [
        "No pneumothorax.",
        "There is no pneumothorax.",
        "No evidence of pneumothorax.",
        "Without evidence of pneumothorax.",
        "Negative for pneumothorax.",
        "The left hemithorax is free of pneumothorax.",
        "Pneumothorax has resolved.",
        "Resolved left pneumothorax.",
        "Pneumothorax has been ruled out.",
        "Pneumothorax is not seen.",
        "There is not a pneumothorax.",
        "Pneumothorax is no longer seen.",
        "Interval resolution of the pneumothorax.",
        "Absence of pneumothorax.",
    ],
)
def test_negation_forms(text: str) -> None:
    check(text, {PX: N, NF: P})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Findings may represent pneumonia.", {PN: U}),
        ("Possible pneumonia.", {PN: U}),
        ("Pneumonia cannot be excluded.", {PN: U}),
        ("Cannot exclude pneumonia.", {PN: U}),
        ("Opacity suggestive of pneumonia.", {OP: P, PN: U}),
        ("Atelectasis versus pneumonia.", {AT: U, PN: U}),
        ("Atelectasis vs. pneumonia.", {AT: U, PN: U}),
        ("Likely pneumonia.", {PN: U}),
        ("Opacity concerning for pneumonia.", {OP: P, PN: U}),
        ("Questionable pneumonia.", {PN: U}),
        ("Pneumonia is suspected.", {PN: U}),
        ("Correlate clinically for pneumonia.", {PN: U}),
        # CheXpert's "no new XXX" rule: an old finding may persist
        ("No new pneumonia.", {PN: U}),
    ],
)
def test_uncertainty_forms(text: str, expected: dict[Observation, Label]) -> None:
    check(text, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "There is cardiomegaly with mild pulmonary edema and small bilateral pleural "
            "effusions.",
            {CM: P, ED: P, PE: P},
        ),
        (
            "No pneumothorax, pleural effusion, or focal consolidation.",
            {PX: N, PE: N, CO: N, NF: P},
        ),
        ("No pneumothorax but there is a small left pleural effusion.", {PX: N, PE: P}),
        ("Right pleural effusion, not a pneumothorax.", {PE: P, PX: N}),
        ("Possible small effusion, no pneumothorax.", {PE: U, PX: N}),
        ("No pneumothorax, likely atelectasis at the bases.", {PX: N, AT: U}),
        ("Bibasilar opacities, likely atelectasis.", {OP: P, AT: U}),
        ("Opacity may represent pneumonia or atelectasis.", {OP: P, PN: U, AT: U}),
        ("Heart size is normal, small left effusion.", {CM: N, PE: P}),
        ("Endotracheal tube and right IJ line in place; no pneumothorax.", {SD: P, PX: N, NF: P}),
        ("No pneumothorax is identified, and the heart is enlarged.", {PX: N, CM: P}),
        ("No focal consolidation to suggest pneumonia.", {CO: N, PN: N, NF: P}),
        ("Heart size and mediastinal contours are normal.", {CM: N, EC: N, NF: P}),
    ],
)
def test_several_findings_in_one_sentence(text: str, expected: dict[Observation, Label]) -> None:
    check(text, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Heart size is normal. Lungs are clear. No pneumothorax or pleural effusion. "
            "No acute cardiopulmonary process.",
            {CM: N, PX: N, PE: N, NF: P},
        ),
        (
            "FINDINGS: PA and lateral views of the chest. The cardiomediastinal silhouette is "
            "within normal limits. The lungs are clear without focal consolidation, pleural "
            "effusion or pneumothorax. No acute osseous abnormality.\n\n"
            "IMPRESSION: No acute cardiopulmonary process.",
            {EC: N, CO: N, PE: N, PX: N, NF: P},
        ),
        ("Normal chest radiograph.", {NF: P}),
        ("No acute cardiopulmonary abnormality.", {NF: P}),
        ("Heart and mediastinum are within normal limits. Lungs are clear.", {CM: N, EC: N, NF: P}),
    ],
)
def test_normal_reports(text: str, expected: dict[Observation, Label]) -> None:
    check(text, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # support devices do not stop No Finding
        ("Endotracheal tube in place. Lungs are clear.", {SD: P, NF: P}),
        # a positive or uncertain finding does
        ("Mild cardiomegaly.", {CM: P}),
        ("Possible small effusion.", {PE: U}),
        # so does one of CheXpert's other findings (no_finding.txt), positive ...
        ("Mild degenerative changes of the thoracic spine.", {}),
        ("Pneumomediastinum.", {}),
        # ... but not a negated one
        ("No emphysema.", {NF: P}),
        # an empty report says nothing at all
        ("", {}),
        ("   \n  ", {}),
    ],
)
def test_no_finding_rule(text: str, expected: dict[Observation, Label]) -> None:
    check(text, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a finding and its negation in two sentences: positive wins (CheXpert aggregation)
        ("Small left effusion. No right effusion.", {PE: P}),
        # uncertain beats negative
        ("No effusion on the right. Possible small left effusion.", {PE: U}),
        # a negation does not reach into the next sentence
        ("No pneumothorax. Small effusion.", {PX: N, PE: P}),
        ("No pneumothorax.\nSmall effusion", {PX: N, PE: P}),
        # pseudo-triggers negate nothing
        ("No change in the small left pleural effusion.", {PE: P}),
        ("Pneumothorax has nearly resolved.", {PX: P}),
        # word boundaries and prefixes
        ("Atelectatic changes at the bases.", {AT: P}),
        ("Patient Oscar.", {NF: P}),
        ("Tuberculosis is a consideration.", {NF: P}),
    ],
)
def test_aggregation_scopes_and_matching(text: str, expected: dict[Observation, Label]) -> None:
    check(text, expected)


@pytest.mark.parametrize("statement", STATEMENTS, ids=lambda s: s.name)
def test_each_normal_or_stable_statement_sets_its_label(statement: Statement) -> None:
    got = label_report(statement.example)
    for obs in statement.observations:
        assert got[obs] is statement.label, statement.example
    cues = {m.cue for m in default_labeler().mentions(statement.example)}
    assert f"statement: {statement.name}" in cues


def test_mentions_point_into_the_original_text_and_name_their_cue() -> None:
    text = "IMPRESSION: No Pneumothorax. Possible LEFT effusion."
    mentions = default_labeler().mentions(text)
    by_obs = {m.observation: m for m in mentions}
    assert text[by_obs[PX].start : by_obs[PX].end] == "Pneumothorax"
    assert (by_obs[PX].label, by_obs[PX].cue, by_obs[PX].sentence) == (N, "no", 0)
    assert text[by_obs[PE].start : by_obs[PE].end] == "effusion"
    assert (by_obs[PE].label, by_obs[PE].cue, by_obs[PE].sentence) == (U, "possible", 1)


def test_batch_deterministic_and_interface() -> None:
    texts = ["No pneumothorax.", "Small effusion.", "Possible pneumonia."]
    fresh = RuleLabeler()
    assert isinstance(fresh, ReportLabeler)
    assert fresh.name.startswith("chexpert-rules/")
    assert label_reports(texts) == [label_report(t) for t in texts] == fresh.label_batch(texts)
    assert [label_report(t) for t in texts] == [label_report(t) for t in texts]


def test_labels_carry_chexpert_values_and_keys() -> None:
    assert [o.title for o in OBSERVATIONS][:3] == [
        "No Finding",
        "Enlarged Cardiomediastinum",
        "Cardiomegaly",
    ]
    assert Observation.from_key("Pleural Effusion") is PE
    assert [lab.chexpert_value for lab in (P, N, U, Label.NOT_MENTIONED)] == [1.0, 0.0, -1.0, None]


def test_the_labeler_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    RuleLabeler().label("Patient John Doe: small left pneumothorax.")
    assert caplog.records == []


def test_the_tricky_sentences_table_in_the_docs_is_what_the_labeler_does() -> None:
    doc = (REPO / "docs" / "labeler.md").read_text(encoding="utf-8")
    table = doc.split("How it labels a few tricky sentences")[1].split("\n## ")[0]
    short = {"pos": P, "neg": N, "unc": U}
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| sentence")]
    assert len(rows) >= 10
    for row in rows:
        text, labels = (c.strip() for c in row.strip("|").split("|")[:2])
        expected = {}
        for part in labels.replace("**", "").split(", "):
            title, label = part.rsplit(" ", 1)
            expected[Observation.from_key(title)] = short[label]
        check(text, expected)
