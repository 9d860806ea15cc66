"""Coded CheXpert findings (integration.coded_findings, TID 1500) and the draft SR's CODE
Finding items (integration.sr, TID 2002): dciodvfy, dsrdump, content tree, UIDs."""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, BasicTextSRStorage, ComprehensiveSRStorage

from integration.coded_findings import (
    FINDING_SITES,
    LABELS,
    LOCAL_SCHEME,
    OBSERVATION_CODES,
    PRESENCE,
    build_coded_findings_sr,
    coded_findings_series_number,
    coded_findings_series_uid,
    positive_finding_codes,
    validate_labels,
)
from integration.errors import SRBuildError
from integration.sr import build_draft_sr
from integration.uids import device_uid, draft_series_number, sr_instance_uid, sr_series_uid
from tests.dicom.conftest import TYPE2_PATIENT_STUDY, dcmtk_binary
from tests.reporting.conftest import (
    ACCESSION,
    FINDINGS,
    GENERATED,
    IMPRESSION,
    MODEL,
    PATIENT_NAME,
    VERSION,
    dciodvfy_errors,
)

CHEXPERT = (
    "no_finding",
    "enlarged_cardiomediastinum",
    "cardiomegaly",
    "lung_opacity",
    "lung_lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "support_devices",
)
LABELLED = {
    "pneumothorax": "positive",
    "pleural_effusion": "negative",
    "lung_opacity": "uncertain",
    "support_devices": "positive",
    "edema": "not_mentioned",
    "cardiomegaly": "negative",
}
MENTIONED = {k: v for k, v in LABELLED.items() if v != "not_mentioned"}
# dciodvfy knows only the standard coding scheme designators; 99LLMCXR is private by design
LOCAL_SCHEME_WARNING = f"Unrecognized defined term <{LOCAL_SCHEME}>"
MEASUREMENT_GROUP = "125007"
TRACKING_IDENTIFIER = "112039"
TRACKING_UID = "112040"
FINDING_SITE = "363698007"
FINDING = "121071"
DRAFT_DYNAMIC = ("InstanceCreationDate", "InstanceCreationTime")


def draft_uid(source: Dataset) -> str:
    return sr_instance_uid(
        source.StudyInstanceUID,
        MODEL,
        VERSION,
        inputs=[source.SOPInstanceUID],
        findings=FINDINGS,
        impression=IMPRESSION,
    )


def build(source: Dataset, labels: Mapping[str, str] = LABELLED, **kw: object) -> Dataset:
    args: dict[str, object] = {
        "model_name": MODEL,
        "model_version": VERSION,
        "demo": True,
        "draft_sr_uid": draft_uid(source),
        "content_datetime": GENERATED,
        "software_version": "llm-cxr-node test",
    }
    args.update(kw)
    return build_coded_findings_sr(source, labels, **args)  # type: ignore[arg-type]


def build_draft(source: Dataset, **kw: object) -> Dataset:
    args: dict[str, object] = {
        "evidence": [source],
        "image_read": source,
        "findings": FINDINGS,
        "impression": IMPRESSION,
        "algorithm_name": MODEL,
        "algorithm_version": VERSION,
        "manufacturer": "llm-cxr-node",
        "software_version": "llm-cxr-node test",
        "demo": True,
        "sop_instance_uid": draft_uid(source),
        "series_instance_uid": sr_series_uid(source.StudyInstanceUID, MODEL, VERSION),
        "series_number": draft_series_number("sr", MODEL, VERSION),
        "created_at": GENERATED,
    }
    args.update(kw)
    return build_draft_sr(**args)  # type: ignore[arg-type]


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_dciodvfy_clean(path: Path) -> None:
    """No dciodvfy error; no warning but the private coding scheme's."""
    errors, warnings = dciodvfy_errors(path)
    assert errors == []
    assert [w for w in warnings if LOCAL_SCHEME_WARNING not in w] == []


def dsrdump(path: Path) -> str:
    """DCMTK's dsrdump output (UTF-8, long texts in full); fails on a read error."""
    proc = subprocess.run(
        [dcmtk_binary("dsrdump"), "+Pl", "+U8", str(path)], capture_output=True, timeout=60
    )
    errors = proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode == 0, errors
    assert not [line for line in errors.splitlines() if line.startswith(("E:", "F:"))], errors
    return proc.stdout.decode("utf-8", errors="replace")


def walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def code_of(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str, str]:
    code = item[keyword][0]
    return (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)


def groups(sr: Dataset) -> dict[str, list[Dataset]]:
    """The observation (from the Tracking Identifier) of each measurement group to its items."""
    found: dict[str, list[Dataset]] = {}
    for group in walk(sr.ContentSequence):
        if group.ValueType == "CONTAINER" and code_of(group)[0] == MEASUREMENT_GROUP:
            children = list(group.ContentSequence)
            (tracking,) = [c for c in children if code_of(c)[0] == TRACKING_IDENTIFIER]
            found[tracking.TextValue.removeprefix("CheXpert ")] = children
    return found


def evaluations(sr: Dataset) -> dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]]:
    """Each group's observation to its one evaluation (concept name, value)."""
    found = {}
    for name, children in groups(sr).items():
        (code,) = [
            c for c in children if c.ValueType == "CODE" and c.RelationshipType == "CONTAINS"
        ]
        found[name] = (code_of(code), code_of(code, "ConceptCodeSequence"))
    return found


def expected(labels: Mapping[str, str]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    out = {}
    for name, label in labels.items():
        if label == "not_mentioned":
            continue
        first, presence = OBSERVATION_CODES[name][0], PRESENCE[label]
        out[name] = (
            (first.value, first.scheme_designator, first.meaning),
            (presence.value, presence.scheme_designator, presence.meaning),
        )
    return out


def without_dynamic(ds: Dataset) -> bytes:
    """The SR's bytes with the instance creation time and contribution time blanked."""
    ds = copy.deepcopy(ds)
    for keyword in DRAFT_DYNAMIC:
        ds[keyword].value = ""
    for item in ds.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = ""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- the codes as data ------------------------------------------------------------------


def test_observation_codes_are_the_fourteen_chexpert_observations() -> None:
    assert tuple(OBSERVATION_CODES) == CHEXPERT
    for name, codes in OBSERVATION_CODES.items():
        assert codes, name
        for code in codes:
            assert 0 < len(code.value) <= 16 and code.meaning  # VR SH, a meaning
            assert code.scheme_designator in ("SCT", "DCM", LOCAL_SCHEME)
    local = {n for n, c in OBSERVATION_CODES.items() if c[0].scheme_designator == LOCAL_SCHEME}
    assert local == {"enlarged_cardiomediastinum", "pleural_other", "support_devices"}
    assert OBSERVATION_CODES["pneumothorax"][0].value == "36118008"
    assert OBSERVATION_CODES["lung_opacity"][0].value == "112001"
    assert {c.value for c in OBSERVATION_CODES["support_devices"][1:]} == {
        "26412008",
        "19923001",
        "14106009",
        "360129009",
        "25062003",
        "112173",
        "112174",
    }
    assert {n: c.value for n, c in FINDING_SITES.items()} == {
        "lung_opacity": "39607008",
        "lung_lesion": "39607008",
    }
    assert {k: (c.value, c.scheme_designator) for k, c in PRESENCE.items()} == {
        "positive": ("52101004", "SCT"),
        "negative": ("272519000", "SCT"),
        "uncertain": ("373068000", "SCT"),
    }
    assert LABELS == ("positive", "negative", "uncertain", "not_mentioned")


# --- the coded findings SR (TID 1500) ---------------------------------------------------


def test_coded_findings_sr_is_valid_and_round_trips(source: Dataset, tmp_path: Path) -> None:
    sr = build(source)
    path = write(sr, tmp_path / "coded.dcm")
    assert_dciodvfy_clean(path)
    dump = dsrdump(path)
    assert "Imaging Measurement Report" in dump and "Measurement Group" in dump
    assert "PRELIMINARY" in dump and "PARTIAL" in dump and "UNVERIFIED" in dump
    assert '"Pneumothorax")=(52101004,SCT,"Present")' in dump

    back = hd.sr.srread(path)
    assert isinstance(back, hd.sr.ComprehensiveSR)
    assert back.SOPClassUID == ComprehensiveSRStorage
    assert (back.CompletionFlag, back.VerificationFlag, back.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert back.SeriesDescription == "AI DRAFT UNVERIFIED - coded findings (DEMO)"
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert code_of(back)[0] == "126000"  # CID 7021 Imaging Measurement Report
    # patient and study copied from the image, as the draft SR copies them
    assert str(back.PatientName) == PATIENT_NAME
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.PatientID == source.PatientID
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.AccessionNumber == ACCESSION
    assert back.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS-A"
    assert back.ReferencedRequestSequence[0].AccessionNumber == ACCESSION
    # made at 07:08:09 UTC; the object's times are in the study's zone, -0400 (C.12.1.1.8)
    assert back.TimezoneOffsetFromUTC == source.TimezoneOffsetFromUTC == "-0400"
    assert (back.ContentDate, back.ContentTime) == ("20240506", "030809")
    assert back.SeriesDate == back.ContentDate
    assert back.SeriesNumber == coded_findings_series_number(MODEL, VERSION)
    assert back.SeriesInstanceUID == coded_findings_series_uid(
        source.StudyInstanceUID, MODEL, VERSION
    )
    assert back.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == LOCAL_SCHEME


@pytest.mark.parametrize("absent", TYPE2_PATIENT_STUDY)
def test_an_image_without_a_type2_attribute_gets_its_coded_sr(
    source: Dataset, tmp_path: Path, absent: str
) -> None:
    """A Type 2 Patient or Study attribute the image lacks is empty in the coded SR
    (PS3.3 C.7.1.1, C.7.2.1; before: highdicom raised, no coded SR)."""
    image = copy.deepcopy(source)
    delattr(image, absent)
    sr = build(image)
    errors, _ = dciodvfy_errors(write(sr, tmp_path / "coded.dcm"))
    assert errors == []
    assert absent in sr and sr[absent].value in ("", None)


def test_observer_is_the_ai_device(source: Dataset) -> None:
    sr = build(source)
    context = {
        code_of(i)[2]: i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"
    }
    assert code_of(context["Observer Type"], "ConceptCodeSequence")[0] == "121007"  # Device
    observer_uid: str = context["Device Observer UID"].UID
    assert observer_uid == device_uid(MODEL, VERSION)
    assert context["Device Observer Name"].TextValue == MODEL
    assert context["Device Observer Model Name"].TextValue == f"{MODEL} {VERSION}"
    assert context["Device Observer Manufacturer"].TextValue == "llm-cxr-node"
    algorithm = [
        i.TextValue for i in walk(sr.ContentSequence) if code_of(i)[2] == "Algorithm Version"
    ]
    assert algorithm == [VERSION] * len(MENTIONED)  # TID 4019 in each group
    equipment = sr.ContributingEquipmentSequence
    assert any(
        e.ManufacturerModelName == MODEL and e.SoftwareVersions == VERSION for e in equipment
    )


def test_one_evaluation_per_mentioned_observation(source: Dataset) -> None:
    sr = build(source)
    found = evaluations(sr)
    assert found == expected(LABELLED)
    assert "edema" not in found  # not_mentioned: no item at all
    assert all(code_of(i)[0] != "19242006" for i in walk(sr.ContentSequence))
    sites = {
        name: [code_of(c, "ConceptCodeSequence")[0] for c in items if code_of(c)[0] == FINDING_SITE]
        for name, items in groups(sr).items()
    }
    assert sites["lung_opacity"] == ["39607008"]  # Lung
    assert sites["pneumothorax"] == []
    images = [i for i in walk(sr.ContentSequence) if i.ValueType == "IMAGE"]
    assert len(images) == len(MENTIONED)
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} == {
        source.SOPInstanceUID
    }


def test_all_fourteen_observations(source: Dataset, tmp_path: Path) -> None:
    labels = {name: LABELS[i % 3] for i, name in enumerate(CHEXPERT)}
    sr = build(source, labels)
    assert evaluations(sr) == expected(labels)
    assert len(evaluations(sr)) == 14
    assert_dciodvfy_clean(write(sr, tmp_path / "all.dcm"))


def test_only_standard_codes_need_no_scheme_identification(source: Dataset, tmp_path: Path) -> None:
    sr = build(source, {"pneumothorax": "negative", "no_finding": "positive"}, demo=False)
    assert "CodingSchemeIdentificationSequence" not in sr
    assert sr.SeriesDescription == "AI DRAFT UNVERIFIED - coded findings"
    path = write(sr, tmp_path / "standard.dcm")
    errors, warnings = dciodvfy_errors(path)
    assert errors == [] and warnings == []


def test_draft_sr_is_referenced_as_evidence(source: Dataset) -> None:
    sr = build(source)
    study = source.StudyInstanceUID
    refs = {
        (series.SeriesInstanceUID, ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert refs == {
        (source.SeriesInstanceUID, source.SOPClassUID, source.SOPInstanceUID),
        (sr_series_uid(study, MODEL, VERSION), ComprehensiveSRStorage, draft_uid(source)),
    }
    assert "PredecessorDocumentsSequence" not in sr  # it does not replace the draft
    basic = build(source, draft_sr_series_uid="1.2.3.4", draft_sr_class_uid=BasicTextSRStorage)
    refs = {
        (series.SeriesInstanceUID, ref.ReferencedSOPClassUID)
        for series in basic.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert ("1.2.3.4", BasicTextSRStorage) in refs
    alone = build(source, draft_sr_uid=None)
    series = alone.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in series] == [
        source.SOPInstanceUID
    ]


def test_uids_are_deterministic(source: Dataset) -> None:
    a, b = build(source), build(source, content_datetime=dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert [i.UID for i in walk(a.ContentSequence) if code_of(i)[0] == TRACKING_UID] == [
        i.UID for i in walk(b.ContentSequence) if code_of(i)[0] == TRACKING_UID
    ]
    assert UID(a.SOPInstanceUID).is_valid and a.SOPInstanceUID != draft_uid(source)
    # not_mentioned adds nothing, so the same UID
    same = build(source, {**LABELLED, "fracture": "not_mentioned"})
    assert same.SOPInstanceUID == a.SOPInstanceUID
    other_labels = build(source, {**LABELLED, "fracture": "positive"})
    other_draft = build(source, draft_sr_uid="2.25.12345")
    no_draft = build(source, draft_sr_uid=None)
    uids = {a.SOPInstanceUID, other_labels.SOPInstanceUID, other_draft.SOPInstanceUID}
    assert len(uids | {no_draft.SOPInstanceUID}) == 4
    assert other_draft.SeriesInstanceUID == a.SeriesInstanceUID  # one series per model version
    assert build(source, draft_sr_uid=None).SOPInstanceUID == no_draft.SOPInstanceUID
    newer = build(source, model_version="1.0.1")
    assert newer.SeriesInstanceUID != a.SeriesInstanceUID
    number = coded_findings_series_number(MODEL, VERSION)
    assert number % 10 == 4 and number // 10 == draft_series_number("sr", MODEL, VERSION) // 10
    assert build(source, series_number=9904).SeriesNumber == 9904


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_unknown_observation_or_label_is_refused(source: Dataset) -> None:
    with pytest.raises(ValueError, match="'pneumoperitoneum'"):
        build(source, {"pneumoperitoneum": "positive"})
    with pytest.raises(ValueError, match="'maybe' for edema"):
        build(source, {"edema": "maybe"})
    with pytest.raises(ValueError, match="nothing to code"):
        build(source, {"edema": "not_mentioned"})
    with pytest.raises(ValueError, match="nothing to code"):
        build(source, {})
    with pytest.raises(SRBuildError, match="draft_sr_uid"):
        build(source, draft_sr_uid="1.02.x")
    with pytest.raises(SRBuildError, match="model_version"):
        build(source, model_version=" ")
    assert validate_labels({"edema": "not_mentioned", "fracture": "uncertain"}) == {
        "fracture": "uncertain"
    }
    assert positive_finding_codes(LABELLED) == [
        OBSERVATION_CODES["pneumothorax"][0],
        OBSERVATION_CODES["support_devices"][0],
    ]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_refusal_does_not_quote_patient_values(source: Dataset) -> None:
    bad = copy.deepcopy(source)
    bad.PatientBirthDate = "1951-03-14"
    with pytest.raises(SRBuildError) as info:
        build(bad)
    assert "1951" not in str(info.value) and "Müller" not in str(info.value)


def test_image_library_when_the_header_describes_the_image(source: Dataset, tmp_path: Path) -> None:
    """TID 1600 needs Imager Pixel Spacing for a CR; RG1 has none, so it is left out."""
    assert "Image Library" not in {code_of(i)[2] for i in walk(build(source).ContentSequence)}
    spaced = copy.deepcopy(source)
    spaced.ImagerPixelSpacing = [0.1, 0.1]
    sr = build(spaced)
    assert "Image Library" in {code_of(i)[2] for i in walk(sr.ContentSequence)}
    assert_dciodvfy_clean(write(sr, tmp_path / "library.dcm"))


# --- CODE Finding items in the draft SR (TID 2000 / TID 2002) ---------------------------


def findings_heading(sr: Dataset) -> list[Dataset]:
    heading = [i for i in sr.ContentSequence if code_of(i)[0] == "59776-5"]
    assert len(heading) == 1
    return list(heading[0].ContentSequence)


@pytest.mark.parametrize("kind", ["comprehensive", "basic"])
def test_draft_sr_codes_positive_findings_only(source: Dataset, kind: str, tmp_path: Path) -> None:
    sr = build_draft(source, coded_findings=LABELLED, kind=kind)
    path = write(sr, tmp_path / "draft.dcm")
    assert_dciodvfy_clean(path)
    dump = dsrdump(path)
    assert '"Finding")=(36118008,SCT,"Pneumothorax")' in dump
    items = findings_heading(sr)
    assert [(i.ValueType, code_of(i)[0]) for i in items] == [
        ("TEXT", FINDING),
        ("CODE", FINDING),
        ("CODE", FINDING),
    ]
    assert [code_of(i, "ConceptCodeSequence") for i in items[1:]] == [
        ("36118008", "SCT", "Pneumothorax"),
        ("SUPPORT-DEVICE", LOCAL_SCHEME, "Support device"),
    ]
    assert all("ContentSequence" not in item for item in items[1:])  # Basic Text SR rule
    values = {
        code_of(i, "ConceptCodeSequence")[0]
        for i in walk(sr.ContentSequence)
        if i.ValueType == "CODE"
    }
    assert not values & {"60046008", "112001", "8186001"}  # negative or uncertain: left out
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == LOCAL_SCHEME


def test_draft_sr_codes_without_findings_text(source: Dataset, tmp_path: Path) -> None:
    sr = build_draft(source, findings=None, coded_findings={"pneumothorax": "positive"})
    items = findings_heading(sr)
    assert [code_of(i, "ConceptCodeSequence")[0] for i in items] == ["36118008"]
    assert "CodingSchemeIdentificationSequence" not in sr
    errors, warnings = dciodvfy_errors(write(sr, tmp_path / "draft.dcm"))
    assert errors == [] and warnings == []


@pytest.mark.parametrize("findings", [FINDINGS, None])
def test_draft_sr_unchanged_without_positive_coded_findings(
    source: Dataset, findings: str | None
) -> None:
    plain = without_dynamic(build_draft(source, findings=findings))
    assert without_dynamic(build_draft(source, findings=findings, coded_findings=None)) == plain
    for labels in (
        {},
        {"edema": "negative", "fracture": "uncertain", "atelectasis": "not_mentioned"},
    ):
        assert (
            without_dynamic(build_draft(source, findings=findings, coded_findings=labels)) == plain
        )
    coded = build_draft(source, findings=findings, coded_findings={"edema": "positive"})
    assert without_dynamic(coded) != plain


def test_draft_sr_refuses_unknown_coded_findings(source: Dataset) -> None:
    with pytest.raises(SRBuildError, match="'lung_mass'"):
        build_draft(source, coded_findings={"lung_mass": "positive"})
    with pytest.raises(SRBuildError, match="'yes' for edema"):
        build_draft(source, coded_findings={"edema": "yes"})
