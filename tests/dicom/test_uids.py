"""Deterministic UIDs (integration.uids)."""

from __future__ import annotations

import hashlib

import pytest
from pydicom.uid import UID

from integration.uids import (
    DRAFT_KINDS,
    deterministic_uid,
    device_uid,
    draft_instance_uid,
    draft_series_number,
    draft_series_uid,
    sr_instance_uid,
    sr_series_uid,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"


def test_stable_and_valid() -> None:
    a = deterministic_uid(STUDY, "LLM-CXR", "1.0")
    assert a == deterministic_uid(STUDY, "LLM-CXR", "1.0")
    assert a.startswith("2.25.") and len(a) <= 64 and UID(a).is_valid
    assert not a[5:].startswith("0") or a == "2.25.0"


def test_differs_per_part_and_per_split() -> None:
    base = deterministic_uid(STUDY, "LLM-CXR", "1.0")
    assert base != deterministic_uid(STUDY, "LLM-CXR", "1.1")
    assert base != deterministic_uid(STUDY, "LLM-CXR-demo", "1.0")
    assert base != deterministic_uid(STUDY + "1", "LLM-CXR", "1.0")
    assert deterministic_uid("ab", "c") != deterministic_uid("a", "bc")


def test_sr_helpers_distinct() -> None:
    def sr(version: str = "1", *, inputs: tuple[str, ...] = ("1.2.3",), imp: str = "I") -> str:
        return sr_instance_uid(
            STUDY, "m", version, inputs=list(inputs), findings="F", impression=imp
        )

    inst, series = sr(), sr_series_uid(STUDY, "m", "1")
    assert inst != series
    assert inst == sr() != sr("2")
    assert sr(inputs=("1.2.3", "1.2.4")) == sr(inputs=("1.2.4", "1.2.3")) != inst  # a set
    assert sr(imp="Other") != inst and sr(imp="  I \n") == inst
    assert sr_series_uid(STUDY, "m", "1") == draft_series_uid("sr", STUDY, "m", "1")
    assert draft_instance_uid("pdf", STUDY, "m", "1", inputs=["1.2.3"], text="F\x1fI") != inst
    assert device_uid("m", "1") != device_uid("m", "2")
    assert all(UID(u).is_valid for u in (inst, series, device_uid("m", "1")))
    with pytest.raises(ValueError, match="kind"):
        draft_series_uid("xml", STUDY, "m", "1")


def test_series_numbers_per_model_version_and_kind() -> None:
    numbers = {draft_series_number(k, "m", "1") for k in DRAFT_KINDS}
    assert len(numbers) == len(DRAFT_KINDS) and all(7001 <= n <= 7999 for n in numbers)
    assert {n // 10 for n in numbers} == {draft_series_number("sr", "m", "1") // 10}
    assert draft_series_number("sr", "m", "1") == draft_series_number("sr", "m", "1")
    versions = {draft_series_number("sr", "m", str(v)) for v in range(50)}
    assert len(versions) > 30  # spread over the hundred slots


def test_many_are_valid() -> None:
    uids = {deterministic_uid(STUDY, str(i)) for i in range(2000)}
    assert len(uids) == 2000
    assert all(len(u) <= 64 and UID(u).is_valid for u in uids)


@pytest.mark.parametrize("parts", [(), ("",), ("a", "")])
def test_rejects_empty(parts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        deterministic_uid(*parts)


def test_a_reissue_gets_new_uids_and_the_first_issue_keeps_its_own() -> None:
    """A draft made again after its withdrawal is a new issue with a UID of its own; issue 0
    is the UID drafts have always had (the parts without a reissue part)."""

    def uid(reissue: int = 0) -> str:
        return draft_instance_uid(
            "sr", STUDY, "m", "1", inputs=["1.2.3"], text="F\x1fI", reissue=reissue
        )

    first = deterministic_uid("sr-instance", STUDY, "m", "1", "1.2.3", _sha256("F\x1fI"))
    assert uid() == uid(0) == first
    assert len({uid(0), uid(1), uid(2)}) == 3 and uid(1) == uid(1)
    assert all(UID(uid(n)).is_valid for n in range(3))
    with pytest.raises(ValueError, match="reissue"):
        uid(-1)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
