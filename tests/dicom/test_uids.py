"""Deterministic UIDs (integration.uids)."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from integration.uids import deterministic_uid, device_uid, sr_instance_uid, sr_series_uid

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
    inst, series = sr_instance_uid(STUDY, "m", "1"), sr_series_uid(STUDY, "m", "1")
    assert inst != series
    assert inst == sr_instance_uid(STUDY, "m", "1") != sr_instance_uid(STUDY, "m", "2")
    assert device_uid("m", "1") != device_uid("m", "2")
    assert all(UID(u).is_valid for u in (inst, series, device_uid("m", "1")))


def test_many_are_valid() -> None:
    uids = {deterministic_uid(STUDY, str(i)) for i in range(2000)}
    assert len(uids) == 2000
    assert all(len(u) <= 64 and UID(u).is_valid for u in uids)


@pytest.mark.parametrize("parts", [(), ("",), ("a", "")])
def test_rejects_empty(parts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        deterministic_uid(*parts)
