"""Study priority from Requested Procedure Priority (0040,1003) and site rules."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from integration.priority import PriorityRule, order_priority, study_priority


def _ds(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("value", "expected"),
    [("STAT", 100), ("stat ", 100), ("HIGH", 50), ("ROUTINE", 0), ("MEDIUM", 0), ("LOW", -50)],
)
def test_order_priority_top_level(value: str, expected: int) -> None:
    assert study_priority(_ds(RequestedProcedurePriority=value)) == expected


def test_order_priority_in_request_attributes_sequence() -> None:
    item = _ds(RequestedProcedurePriority="STAT", RequestedProcedureID="RP1")
    ds = _ds(RequestAttributesSequence=[_ds(RequestedProcedureID="RP0"), item])
    assert order_priority(ds) == "STAT"
    assert study_priority(ds) == 100


def test_absent_or_unknown_priority_is_routine() -> None:
    assert order_priority(_ds()) is None
    assert order_priority(_ds(RequestedProcedurePriority="URGENT!!")) is None
    assert study_priority(_ds(RequestedProcedurePriority="")) == 0


def test_rules_raise_but_never_lower() -> None:
    ed = PriorityRule(when={"CallingAETitle": "ED_*"}, priority=80)
    low = PriorityRule(when={"StationName": "*"}, priority=-10)
    ds = _ds(StationName="CR01")
    assert study_priority(ds, calling_ae="ED_CR1", rules=[ed, low]) == 80
    assert study_priority(ds, calling_ae="WARD_CR", rules=[ed, low]) == 0
    # an order's STAT stays above a lower rule
    stat = _ds(RequestedProcedurePriority="STAT", StationName="CR01")
    assert study_priority(stat, calling_ae="ED_CR1", rules=[ed]) == 100


def test_rule_needs_every_field_and_the_attribute() -> None:
    rule = PriorityRule(
        when={"InstitutionalDepartmentName": "emergency*", "StationName": "cr?"}, priority=60
    )
    assert rule.matches(_ds(InstitutionalDepartmentName="Emergency Dept", StationName="CR2"), None)
    assert not rule.matches(_ds(InstitutionalDepartmentName="Emergency Dept"), None)
    assert not rule.matches(_ds(InstitutionalDepartmentName="ICU", StationName="CR2"), None)


@pytest.mark.parametrize(
    ("when", "priority", "message"),
    [
        ({}, 10, "names no field"),
        ({"PatientName": "X*"}, 10, "unknown field"),
        ({"StationName": "X"}, True, "must be an integer"),
        ({"StationName": "X"}, 5000, "outside"),
    ],
)
def test_bad_rules_are_refused(when: dict[str, str], priority: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PriorityRule(when=when, priority=priority)
