"""IOCM rejection note (integration.kos) for a draft SR and its PDF: dciodvfy, content."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from integration.errors import KosBuildError
from integration.kos import (
    KEY_OBJECT_SELECTION_STORAGE,
    REJECTED_FOR_PATIENT_SAFETY,
    REJECTED_FOR_QUALITY,
    build_rejection_note,
)
from integration.report_pdf import DraftReportContent, render_report_pdf
from integration.uids import deterministic_uid
from tests.helpers import node_draft_pdf, node_draft_sr
from tests.reporting.conftest import (
    FINDINGS,
    GENERATED,
    IMPRESSION,
    MODEL,
    PATIENT_NAME,
    VERSION,
    dciodvfy_errors,
)


@pytest.fixture(scope="module")
def withdrawn(source: Dataset, content: DraftReportContent) -> list[Dataset]:
    """The draft SR and the draft PDF of the source's study, as sent."""
    sr = node_draft_sr(
        source,
        findings=FINDINGS,
        impression=IMPRESSION,
        model=MODEL,
        version=VERSION,
        series_number=9901,
        instance_number=1,
    )
    pdf = node_draft_pdf(
        render_report_pdf(content), source, model=MODEL, version=VERSION, created_at=GENERATED
    )
    return [sr, pdf]


def build(withdrawn: list[Dataset], **kw: object) -> hd.ko.KeyObjectSelectionDocument:
    args: dict[str, object] = {
        "sop_instance_uid": deterministic_uid("kos", "1"),
        "series_instance_uid": deterministic_uid("kos-series", "1"),
        "series_number": 9903,
        "manufacturer": "llm-cxr-node",
        "reason": "sent for the wrong study",
        "demo": True,
    }
    args.update(kw)
    return build_rejection_note(withdrawn, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("title", [REJECTED_FOR_QUALITY, REJECTED_FOR_PATIENT_SAFETY])
def test_rejection_note_is_valid_and_references_the_drafts(
    withdrawn: list[Dataset], source: Dataset, title: Code, tmp_path: Path
) -> None:
    path = tmp_path / "kos.dcm"
    build(withdrawn, title=title).save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_errors(path)
    assert errors == [] and warnings == []

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == KEY_OBJECT_SELECTION_STORAGE
    assert back.Modality == "KO"
    assert back.SeriesDescription == "AI DRAFT WITHDRAWN - rejection note (DEMO)"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert str(back.PatientName) == PATIENT_NAME
    assert back.PatientID == source.PatientID
    concept = back.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning) == (
        title.value,
        title.scheme_designator,
        title.meaning,
    )

    expected = {(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in withdrawn}
    composites = set()
    description = ""
    for item in back.ContentSequence:
        if item.ValueType == "COMPOSITE":
            ref = item.ReferencedSOPSequence[0]
            composites.add((ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID))
        elif item.ValueType == "TEXT":
            assert item.ConceptNameCodeSequence[0].CodeValue == "113012"
            description = item.TextValue
    assert composites == expected
    assert description == "AI draft withdrawn: sent for the wrong study"

    (study_item,) = back.CurrentRequestedProcedureEvidenceSequence
    assert study_item.StudyInstanceUID == source.StudyInstanceUID
    evidence = {
        (series.SeriesInstanceUID, ref.ReferencedSOPInstanceUID)
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)) for ds in withdrawn}


def test_a_title_outside_the_rejection_titles_is_refused(withdrawn: list[Dataset]) -> None:
    worklist = Code("113038", "DCM", "Incorrect Modality Worklist Entry")
    with pytest.raises(KosBuildError, match="rejection title"):
        build(withdrawn, title=worklist)


def test_instances_of_two_studies_are_refused(withdrawn: list[Dataset]) -> None:
    other = copy.deepcopy(withdrawn[1])
    other.StudyInstanceUID = deterministic_uid("another study")
    with pytest.raises(KosBuildError, match="exactly one study"):
        build([withdrawn[0], other])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reason": "  "}, "reason"),
        ({"sop_instance_uid": "1.2.03"}, "not a valid UID"),
    ],
)
def test_invalid_inputs_are_refused(
    withdrawn: list[Dataset], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(KosBuildError, match=message):
        build(withdrawn, **kwargs)


def test_nothing_to_reject() -> None:
    with pytest.raises(KosBuildError, match="nothing to reject"):
        build([])


def test_note_uid_must_differ_from_the_drafts(withdrawn: list[Dataset]) -> None:
    with pytest.raises(KosBuildError, match="equals a withdrawn"):
        build(withdrawn, sop_instance_uid=str(withdrawn[0].SOPInstanceUID))


@pytest.mark.parametrize(
    ("offset", "stated"), [("-0400", ("20240506", "030809")), (None, ("20240506", "123809"))]
)
@pytest.mark.usefixtures("host_at_plus_0530")
def test_the_notes_times_are_in_the_drafts_zone(
    withdrawn: list[Dataset], offset: str | None, stated: tuple[str, str]
) -> None:
    """The note copies the drafts' Study Date/Time, so it states their Timezone Offset From
    UTC and its own Content and Instance Creation Date/Time in that zone (PS3.3
    C.12.1.1.8), as the draft SR and PDF do; for drafts without an offset, none and the
    node's local time (here +05:30). Before, it stated no offset and the host's clock, so
    a study at -0400 was declared of no zone and the note dated in another one."""
    drafts = [copy.deepcopy(ds) for ds in withdrawn]
    for ds in drafts:
        if offset is None:
            del ds.TimezoneOffsetFromUTC
        else:
            assert ds.TimezoneOffsetFromUTC == offset
    note = build(drafts, created_at=dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC))
    assert note.get("TimezoneOffsetFromUTC") == offset
    assert (str(note.ContentDate), str(note.ContentTime)) == stated
    assert (str(note.InstanceCreationDate), str(note.InstanceCreationTime)) == stated
    assert (str(note.StudyDate), str(note.StudyTime)) == (drafts[0].StudyDate, drafts[0].StudyTime)
