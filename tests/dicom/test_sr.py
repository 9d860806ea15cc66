"""Draft SR writer (integration.sr): validated with dciodvfy, dsrdump and highdicom."""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from integration.draft_header import requested_procedures_from
from integration.errors import SRBuildError
from integration.header_values import utc_offset
from integration.sr import AI_DRAFT_NOTE, BASIC_TEXT_SR_STORAGE, DEMO_NOTE, build_draft_sr
from integration.uids import device_uid, draft_series_number, sr_instance_uid, sr_series_uid
from tests.dicom.conftest import TYPE2_PATIENT_STUDY, dcmtk_binary, which_or_skip

FINDINGS_DE = "Kein Pleuraerguss. Herzgröße normal – Zwerchfell glatt begrenzt."
IMPRESSION_JA = "急性の心肺異常なし。No acute cardiopulmonary process."
MODEL, VERSION = "LLM-CXR", "1.0.0-demo"


def build(
    source: Dataset, /, *, demo: bool = True, version: str = VERSION, **kw: object
) -> hd.sr.ComprehensiveSR:
    study = source.StudyInstanceUID
    args: dict[str, object] = {
        "evidence": [source],
        "image_read": source,
        "findings": FINDINGS_DE,
        "impression": IMPRESSION_JA,
        "algorithm_name": MODEL,
        "algorithm_version": version,
        "manufacturer": "llm-cxr-node",
        "software_version": "llm-cxr-node 0.1.0",
        "demo": demo,
        "series_instance_uid": sr_series_uid(study, MODEL, version),
        "series_number": draft_series_number("sr", MODEL, version),
        "instance_number": 1,
    }
    args.update(kw)
    args.setdefault(
        "sop_instance_uid",
        sr_instance_uid(
            study,
            MODEL,
            version,
            inputs=[str(ds.SOPInstanceUID) for ds in args["evidence"]],  # type: ignore[attr-defined]
            findings=args["findings"],  # type: ignore[arg-type]
            impression=str(args["impression"]),
        ),
    )
    return build_draft_sr(**args)  # type: ignore[arg-type]


def walk(items: Iterator[Dataset] | list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def texts(ds: Dataset) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in walk(ds.ContentSequence):
        if item.ValueType in ("TEXT", "UIDREF"):
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            out.setdefault(name, []).append(str(item.get("TextValue", item.get("UID", ""))))
    return out


@pytest.fixture(scope="module")
def latin1_source(tmp_path_factory: pytest.TempPathFactory, rg1_header: Dataset) -> Dataset:
    """RG1 (ISO_IR 100) with a Latin-1 patient name, written and read back from disk."""
    ds = copy.deepcopy(rg1_header)
    ds.PatientName = "Müller^Jürgen"
    path = tmp_path_factory.mktemp("src") / "latin1.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    assert "Müller".encode("latin-1") in raw  # really stored as ISO 8859-1
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def japanese_source(tmp_path_factory: pytest.TempPathFactory, rg1_header: Dataset) -> Dataset:
    ds = copy.deepcopy(rg1_header)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "山田^太郎=やまだ^たろう"
    path = tmp_path_factory.mktemp("src") / "utf8.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def write(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def check_dciodvfy(path: Path) -> str:
    tool = which_or_skip("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "Error" in line]
    assert not errors, output
    return output


def check_dsrdump(path: Path) -> str:
    tool = dcmtk_binary("dsrdump")
    proc = subprocess.run([tool, "+Pl", "+U8", str(path)], capture_output=True, timeout=60)
    output = proc.stdout.decode("utf-8", errors="replace")
    errors = proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode == 0, output + errors
    assert not [line for line in errors.splitlines() if line.startswith(("E:", "F:"))], errors
    return output


@pytest.mark.parametrize("source_name", ["rg1_header", "latin1_source", "japanese_source"])
def test_sr_valid_and_round_trips(
    source_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Dataset = request.getfixturevalue(source_name)
    sr = build(source)
    path = write(sr, tmp_path / "sr.dcm")
    check_dciodvfy(path)
    dump = check_dsrdump(path)
    assert FINDINGS_DE in dump and IMPRESSION_JA in dump and DEMO_NOTE in dump
    for section in ("Summary", "Findings", "Impressions", "Diagnostic Imaging Report"):
        assert section in dump
    assert "PRELIMINARY" in dump and "PARTIAL" in dump and "UNVERIFIED" in dump

    back = hd.sr.srread(path)
    assert isinstance(back, hd.sr.ComprehensiveSR)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert (back.CompletionFlag, back.VerificationFlag, back.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert str(back.PatientName) == str(source.PatientName)
    assert back.PatientID == source.PatientID
    assert back.AccessionNumber == source.AccessionNumber
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    assert back.SeriesInstanceUID == sr_series_uid(source.StudyInstanceUID, MODEL, VERSION)
    assert back.SeriesDescription == "AI DRAFT UNVERIFIED - report (DEMO)"
    assert back.SeriesNumber == draft_series_number("sr", MODEL, VERSION)
    assert back.SeriesDate == back.ContentDate and back.SeriesTime == back.ContentTime
    assert len(back.TimezoneOffsetFromUTC) == 5
    # General Equipment is the node; the algorithm is contributing equipment
    assert (back.ManufacturerModelName, back.SoftwareVersions) == (
        "llm-cxr-node",
        "llm-cxr-node 0.1.0",
    )

    evidence = back.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == source.StudyInstanceUID
    series = evidence[0].ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    ref = series.ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )

    root = back.ContentSequence
    assert back.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    # TID 2000: only HAS CONCEPT MOD, HAS OBS CONTEXT and heading CONTAINERs under the root
    for item in root:
        assert item.RelationshipType in ("HAS CONCEPT MOD", "HAS OBS CONTEXT") or (
            item.RelationshipType == "CONTAINS" and item.ValueType == "CONTAINER"
        )
    headings = [i.ConceptNameCodeSequence[0].CodeValue for i in root if i.ValueType == "CONTAINER"]
    assert headings == ["55112-7", "59776-5", "19005-8"]  # Summary (the AI notice) first
    found = texts(back)
    assert found["Finding"] == [FINDINGS_DE]
    assert found["Impression"] == [IMPRESSION_JA]
    assert found["Summary"] == [AI_DRAFT_NOTE.format(algorithm=MODEL, version=VERSION), DEMO_NOTE]
    # the image the model read is referenced by the findings and the impression
    images = [i for i in walk(root) if i.ValueType == "IMAGE"]
    assert len(images) == 2
    for image in images:
        assert image.RelationshipType == "INFERRED FROM"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert found["Device Observer UID"] == [device_uid(MODEL, VERSION)]
    assert found["Device Observer Name"] == [MODEL]
    assert found["Device Observer Model Name"] == [f"{MODEL} {VERSION}"]
    observer_type = next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "121005")
    assert observer_type.ConceptCodeSequence[0].CodeValue == "121007"  # Device

    equipment = [
        e
        for e in back.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        and e.ManufacturerModelName == MODEL
    ]
    assert len(equipment) == 1 and equipment[0].SoftwareVersions == VERSION


def test_non_demo_has_no_demo_note(rg1_header: Dataset, tmp_path: Path) -> None:
    sr = build(rg1_header, demo=False)
    found = texts(sr)
    assert found["Summary"] == [AI_DRAFT_NOTE.format(algorithm=MODEL, version=VERSION)]
    assert sr.SeriesDescription == "AI DRAFT UNVERIFIED - report"
    check_dciodvfy(write(sr, tmp_path / "sr.dcm"))


def test_without_findings(rg1_header: Dataset, tmp_path: Path) -> None:
    sr = build(rg1_header, findings=None)
    assert "Finding" not in texts(sr)
    headings = [i.ConceptNameCodeSequence[0].CodeMeaning for i in sr.ContentSequence]
    assert "Findings" not in headings and "Impressions" in headings  # no empty heading
    path = write(sr, tmp_path / "sr.dcm")
    check_dciodvfy(path)
    assert "Impressions" in check_dsrdump(path)


def test_uid_follows_content_and_inputs(rg1_header: Dataset) -> None:
    """Same inputs and text: same UID (a re-send is idempotent); any change: a new one."""
    a, b = build(rg1_header), build(rg1_header)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    c = build(rg1_header, version="1.0.1")
    assert c.SOPInstanceUID != a.SOPInstanceUID and a.SeriesInstanceUID != c.SeriesInstanceUID
    assert draft_series_number("sr", MODEL, VERSION) != draft_series_number("pdf", MODEL, VERSION)
    other_text = build(rg1_header, impression="Small left pleural effusion.")
    assert other_text.SOPInstanceUID != a.SOPInstanceUID
    assert other_text.SeriesInstanceUID == a.SeriesInstanceUID  # same model version: same series
    lateral = copy.deepcopy(rg1_header)
    lateral.SOPInstanceUID = rg1_header.SOPInstanceUID + ".2"
    late = build(rg1_header, evidence=[rg1_header, lateral])  # a late instance, same text
    assert late.SOPInstanceUID != a.SOPInstanceUID


def test_predecessor_link(rg1_header: Dataset, tmp_path: Path) -> None:
    first = build(rg1_header)
    second = build(rg1_header, impression="Changed.", previous_versions=[first])
    pred = second.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == rg1_header.StudyInstanceUID
    ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    check_dciodvfy(write(second, tmp_path / "sr2.dcm"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_validation_errors(rg1_header: Dataset) -> None:
    with pytest.raises(SRBuildError, match="impression"):
        build(rg1_header, impression="  ")
    with pytest.raises(SRBuildError, match="evidence"):
        build(rg1_header, evidence=[])
    other = copy.deepcopy(rg1_header)
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(SRBuildError, match="one study"):
        build(rg1_header, evidence=[rg1_header, other])
    with pytest.raises(SRBuildError, match="SOP Instance UID"):
        build(rg1_header, sop_instance_uid="1.02.x")
    stranger = copy.deepcopy(rg1_header)
    stranger.SOPInstanceUID = "1.2.3.5"
    with pytest.raises(SRBuildError, match="not in the evidence"):
        build(rg1_header, image_read=stranger)


def test_requested_procedure_from_accession(rg1_header: Dataset, tmp_path: Path) -> None:
    requests = requested_procedures_from(rg1_header)
    assert len(requests) == 1 and requests[0].AccessionNumber == rg1_header.AccessionNumber
    sr = build(rg1_header, requested_procedures=requests)
    ref = sr.ReferencedRequestSequence[0]
    assert ref.AccessionNumber == rg1_header.AccessionNumber
    assert ref.StudyInstanceUID == rg1_header.StudyInstanceUID
    check_dciodvfy(write(sr, tmp_path / "sr.dcm"))
    bare = copy.deepcopy(rg1_header)
    del bare.AccessionNumber
    assert requested_procedures_from(bare) == []


def test_evidence_lists_every_instance_and_copies_study_identity(
    rg1_header: Dataset, tmp_path: Path
) -> None:
    """A PA + lateral study: both in the evidence, the PA (the image read) in the tree;
    Issuer of Accession Number and Timezone Offset From UTC copied from the study."""
    pa = copy.deepcopy(rg1_header)
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-A"
    pa.IssuerOfAccessionNumberSequence = [issuer]
    pa.TimezoneOffsetFromUTC = "+0100"
    lateral = copy.deepcopy(pa)
    lateral.SeriesInstanceUID = pa.SeriesInstanceUID + ".7"
    lateral.SOPInstanceUID = pa.SOPInstanceUID + ".7"
    lateral.ViewPosition = "LL"
    sr = build(pa, evidence=[pa, lateral])
    check_dciodvfy(write(sr, tmp_path / "sr.dcm"))
    refs = {
        ref.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert refs == {pa.SOPInstanceUID, lateral.SOPInstanceUID}
    images = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in walk(sr.ContentSequence)
        if i.ValueType == "IMAGE"
    }
    assert images == {pa.SOPInstanceUID}
    assert sr.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS-A"
    assert sr.TimezoneOffsetFromUTC == "+0100"


def test_long_model_name_and_version_are_not_cut_in_the_tree(
    rg1_header: Dataset, tmp_path: Path
) -> None:
    """Device Observer Model Name is TEXT: the whole "<name> <version>" survives."""
    name = "LLM-CXR DEMO (random weights, not for clinical use)"
    version = "demo-h64-l2-seed0-with-a-long-suffix"
    sr = build(rg1_header, algorithm_name=name, version=version)
    assert texts(sr)["Device Observer Model Name"] == [f"{name} {version}"]
    check_dciodvfy(write(sr, tmp_path / "sr.dcm"))


def test_basic_text_sr(rg1_header: Dataset, tmp_path: Path) -> None:
    """The same tree as a Basic Text SR (IHE SINR's class), valid for dciodvfy."""
    sr = build(rg1_header, kind="basic")
    path = write(sr, tmp_path / "basic.dcm")
    check_dciodvfy(path)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == BASIC_TEXT_SR_STORAGE
    assert back.file_meta.MediaStorageSOPClassUID == BASIC_TEXT_SR_STORAGE
    assert texts(back)["Impression"] == [IMPRESSION_JA]


@pytest.mark.parametrize("kind", ["comprehensive", "basic"])
@pytest.mark.parametrize("absent", TYPE2_PATIENT_STUDY)
def test_an_image_without_a_type2_attribute_gets_its_sr(
    rg1_header: Dataset, tmp_path: Path, absent: str, kind: str
) -> None:
    """An image the SCP stored without a Type 2 Patient or Study attribute (an anonymiser
    removed it, an old modality never wrote it) still gets its draft SR, with the attribute
    empty as Type 2 asks (PS3.3 C.7.1.1, C.7.2.1; before: highdicom raised, no SR)."""
    source = copy.deepcopy(rg1_header)
    delattr(source, absent)
    sr = build(source, kind=kind)
    check_dciodvfy(write(sr, tmp_path / "sr.dcm"))
    assert absent in sr and sr[absent].value in ("", None)
    assert absent not in source
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword != absent:
            assert sr[keyword].value == source[keyword].value


@pytest.mark.parametrize(
    ("offset", "content"),
    [("-0400", ("20240506", "030809")), ("+0100", ("20240506", "080809")), (None, None)],
)
@pytest.mark.usefixtures("host_at_plus_0530")
def test_the_srs_times_are_in_the_studys_zone(
    rg1_header: Dataset, offset: str | None, content: tuple[str, str] | None
) -> None:
    """Timezone Offset From UTC applies to every date and time of the SR (PS3.3 C.12.1.1.8),
    the Study Date/Time it copies included: the SR takes the study's offset and states its
    Content, Series and Instance Creation Date/Time in that zone; for a study without an
    offset it states none (the study's times are local, of an unknown zone) and its own in
    the node's local time (here +05:30). Before, the SR stated its UTC clock at the study's
    offset (four hours off at -0400), "+0000" for a study without one, which declared the
    study's times UTC, and highdicom's host clock as its Instance Creation time (nine and a
    half hours late at -0400)."""
    source = copy.deepcopy(rg1_header)
    if offset is None:
        del source.TimezoneOffsetFromUTC
    else:
        source.TimezoneOffsetFromUTC = offset
    sr = build(source, created_at=dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC))
    assert sr.get("TimezoneOffsetFromUTC") == offset
    expected = content or ("20240506", "123809")
    content_at = (str(sr.ContentDate), str(sr.ContentTime))
    assert content_at == (str(sr.SeriesDate), str(sr.SeriesTime)) == expected
    assert (str(sr.InstanceCreationDate), str(sr.InstanceCreationTime)) == expected


@pytest.mark.parametrize("offset", ["+2400", "+0060", "-9999", "0400", "+04:00"])
@pytest.mark.usefixtures("host_at_plus_0530")
def test_an_offset_no_zone_can_be_made_of_reads_as_absent(rg1_header: Dataset, offset: str) -> None:
    """An image whose Timezone Offset From UTC has the form ``&ZZXX`` but no real zone
    (hours over 14, minutes over 59) still gets its draft SR: the offset reads as absent,
    as one of another form does, so the SR states none and the node's local time. Before,
    the SR build raised ValueError (the job failed instead of drafting), and an offset of
    another form was copied into an SR whose times were not in it."""
    source = copy.deepcopy(rg1_header)
    source.TimezoneOffsetFromUTC = offset
    assert utc_offset(source) == ""
    sr = build(source, created_at=dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC))
    assert "TimezoneOffsetFromUTC" not in sr
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20240506", "123809")
