"""Frontal image selection (integration.selection)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from integration.errors import NoFrontalImageError
from integration.selection import classify_view, select_frontal


def header(
    view: str | None = None,
    *,
    series: int = 1,
    instance: int = 1,
    image_type: list[str] | None = None,
    code: tuple[str, str, str] | None = None,
    description: str | None = None,
) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 10, 10
    ds.SeriesNumber, ds.InstanceNumber = series, instance
    if view is not None:
        ds.ViewPosition = view
    if image_type is not None:
        ds.ImageType = image_type
    if code is not None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
        ds.ViewCodeSequence = [item]
    if description is not None:
        ds.SeriesDescription = description
    return ds


def test_pa_beats_ap_regardless_of_order() -> None:
    studies = [header("AP", series=1), header("LL", series=2), header("PA", series=3)]
    sel = select_frontal(studies)
    assert sel.index == 2 and sel.view == "PA" and sel.source == "ViewPosition"
    assert sel.dataset is studies[2]
    assert sel.reason == "PA from ViewPosition; 3 instances: 1 PA, 1 AP, 1 LL"


def test_configurable_order_prefers_ap() -> None:
    studies = [header("PA"), header("AP")]
    assert select_frontal(studies, order=("AP", "PA")).index == 1
    with pytest.raises(ValueError):
        select_frontal(studies, order=("LATERAL",))


def test_ap_only_when_pa_missing() -> None:
    sel = select_frontal([header("LATERAL"), header("AP")])
    assert sel.view == "AP" and sel.index == 1


def test_laterals_excluded_and_reason_recorded() -> None:
    studies = [header("LATERAL"), header("LL"), header(None)]
    with pytest.raises(NoFrontalImageError) as info:
        select_frontal(studies)
    assert info.value.reason == "3 instances: 1 LATERAL, 1 LL, 1 without ViewPosition"
    assert info.value.http_status == 422


def test_two_laterals_and_unknown_reason() -> None:
    with pytest.raises(NoFrontalImageError, match="3 instances: 2 LATERAL, 1 without"):
        select_frontal([header("LATERAL"), header("LAT"), header(None)])


def test_empty_study() -> None:
    with pytest.raises(NoFrontalImageError, match="0 instances"):
        select_frontal([])


def test_view_code_sequence_used_when_no_view_position() -> None:
    pa = header(code=("272479007", "SCT", "postero-anterior"))
    lat = header(code=("399067008", "SCT", "lateral"))
    ap_legacy = header(code=("R-10206", "SRT", "antero-posterior"))
    assert classify_view(pa).view == "PA" and classify_view(pa).source == "ViewCodeSequence"
    assert classify_view(lat).view == "LATERAL"
    assert classify_view(ap_legacy).view == "AP"
    sel = select_frontal([lat, ap_legacy, pa])
    assert sel.index == 2 and sel.reason.startswith("PA from ViewCodeSequence")


def test_description_text_fallback() -> None:
    lat = header(description="THORAX LAT")
    ap = header(description="Chest AP portable")
    plain = header(description="CHEST")
    assert classify_view(lat).view == "LATERAL"
    assert classify_view(ap).view == "AP" and classify_view(ap).source == "description"
    assert classify_view(plain).view is None
    assert select_frontal([lat, plain, ap]).index == 2


def test_view_position_trusted_over_text() -> None:
    ds = header("PA", description="LATERAL")
    assert classify_view(ds).view == "PA"


def test_original_preferred_over_derived_and_tie_break_deterministic() -> None:
    derived = header("PA", series=1, image_type=["DERIVED", "SECONDARY"])
    original_b = header("PA", series=2, instance=2, image_type=["ORIGINAL", "PRIMARY"])
    original_a = header("PA", series=2, instance=1, image_type=["ORIGINAL", "PRIMARY"])
    sel = select_frontal([derived, original_b, original_a])
    assert sel.index == 2


def test_non_image_instances_ignored() -> None:
    sr = Dataset()
    sr.SOPInstanceUID = generate_uid()
    sr.Modality = "SR"
    with pytest.raises(NoFrontalImageError, match="1 not an image"):
        select_frontal([sr, header("LL")])
    assert select_frontal([sr, header("PA")]).index == 1


def test_rg1_is_pa(rg1_header: Dataset) -> None:
    sel = select_frontal([rg1_header])
    assert sel.view == "PA" and sel.reason == "PA from ViewPosition; 1 instance: 1 PA"
