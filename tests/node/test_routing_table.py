"""Routing decisions as a table: DICOM headers (and the calling AE) against the decision of
the default rule set (the chest rule) and of the example rules file shipped in
``deploy/routing-rules.example.toml``, including non-chest, lateral-only and
unknown-modality studies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from node.runtime.routing import facts_from_dataset
from node.settings import ChestRule, load_settings
from node.settings.routing import default_rule_set, load_rule_set

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "routing-rules.example.toml"
ED_PACS = "PACS_ED@10.0.0.21:104"


def _header(**attrs: str) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


CHEST = {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}

# (case, header, calling AE, default: (draft, rule), example file: (draft, rule))
TABLE: list[tuple[str, dict[str, str], str, tuple[bool, str | None], tuple[bool, str | None]]] = [
    ("adult chest PA", {**CHEST, "PatientAge": "054Y"}, "PACS", (True, "chest"), (True, "chest")),
    (
        "chest from the emergency department",
        {**CHEST, "PatientAge": "061Y"},
        "ED_XR1",
        (True, "chest"),
        (True, "ed-chest"),
    ),
    (
        "portable AP from an ICU station",
        {**CHEST, "ViewPosition": "AP", "StationName": "ICU3-PORTABLE", "PatientAge": "070Y"},
        "PACS",
        (True, "chest"),
        (True, "icu-portable"),
    ),
    (
        "child's chest",
        {**CHEST, "PatientAge": "008Y"},
        "PACS",
        (True, "chest"),
        (False, "paediatric"),
    ),
    (
        "chest by study description only",
        {"Modality": "DX", "StudyDescription": "XR THORAX 2 VIEWS", "PatientAge": "040Y"},
        "PACS",
        (True, "chest"),
        (True, "chest"),
    ),
    # the rules look at the study, not at the view: a lateral-only chest study is drafted,
    # and the worker then fails it (no frontal PA/AP image, integration.selection)
    (
        "lateral-only chest",
        {**CHEST, "ViewPosition": "LL", "PatientAge": "050Y"},
        "PACS",
        (True, "chest"),
        (True, "chest"),
    ),
    (
        "non-chest radiograph",
        {"Modality": "CR", "BodyPartExamined": "HAND"},
        "PACS",
        (False, None),
        (False, None),
    ),
    (
        "chest CT",
        {"Modality": "CT", "BodyPartExamined": "CHEST"},
        "PACS",
        (False, None),
        (False, None),
    ),
    ("unknown modality", {"BodyPartExamined": "CHEST"}, "PACS", (False, None), (False, None)),
    ("no header values at all", {}, "PACS", (False, None), (False, None)),
]


@pytest.fixture(scope="module")
def example_rules() -> Any:
    settings = load_settings(None, destinations=f"{ED_PACS},PACS@10.0.0.5:104")
    return load_rule_set(EXAMPLE, chest=ChestRule(), destinations=settings.destinations)


@pytest.mark.parametrize(
    ("case", "header", "calling_ae", "default", "example"), TABLE, ids=[t[0] for t in TABLE]
)
def test_decision_table(
    example_rules: Any,
    case: str,
    header: dict[str, str],
    calling_ae: str,
    default: tuple[bool, str | None],
    example: tuple[bool, str | None],
) -> None:
    facts = [facts_from_dataset(_header(**header), calling_ae=calling_ae)]
    by_default = default_rule_set(ChestRule()).evaluate(facts)
    by_example = example_rules.evaluate(facts)
    assert (by_default.draft, by_default.rule) == default, by_default.reason
    assert (by_example.draft, by_example.rule) == example, by_example.reason
    for decision in (by_default, by_example):
        assert decision.reason  # always says why
        if not decision.draft and decision.rule is None:
            assert decision.reason.startswith("no rule matched")
    if by_example.rule == "ed-chest":
        assert by_example.priority == 100 and by_example.destinations == (ED_PACS,)
    if by_example.rule == "icu-portable":
        assert by_example.model == "llm-cxr"
    # explanations never quote free text or the age
    for value in ("XR THORAX 2 VIEWS", "ICU3-PORTABLE", "008Y", "054Y"):
        assert value not in by_example.reason and value not in by_default.reason
