"""STOW-RS client (integration.stow) against Orthanc's DICOMweb plugin."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from integration.errors import StowError
from integration.stow import StowDestination, stow
from tests.dicom.orthanc import OrthancServer
from tests.helpers import free_port, node_draft_sr


@pytest.fixture(scope="module")
def sr(rg1_header: Dataset) -> Dataset:
    return node_draft_sr(
        rg1_header,
        findings="Lungs are clear.",
        impression="Keine akuten Veränderungen.",
        version="stow-test",
        demo=False,
        series_number=9902,
        instance_number=1,
    )


def test_destination_validation() -> None:
    dest = StowDestination("http://pacs:8042/dicom-web/", authorization="Bearer secret")
    assert dest.studies_url == "http://pacs:8042/dicom-web/studies"
    assert StowDestination("https://x/dw/studies").studies_url == "https://x/dw/studies"
    assert "secret" not in repr(dest) and "secret" not in str(dest)
    for bad in ("pacs:8042/dicom-web", "ftp://pacs/dicom-web", "/dicom-web"):
        with pytest.raises(ValueError):
            StowDestination(bad)


@pytest.mark.integration
def test_stow_to_orthanc(orthanc: OrthancServer, sr: Dataset, tmp_path: Path) -> None:
    result = stow(sr, StowDestination(orthanc.dicomweb_url))
    assert result.ok and result.status == 200 and not result.warning
    assert result.sop_instance_uid == sr.SOPInstanceUID
    instance_id = orthanc.find_instance(sr.SOPInstanceUID)
    assert instance_id is not None
    tags = orthanc.simplified_tags(instance_id)
    assert tags["StudyInstanceUID"] == sr.StudyInstanceUID
    assert tags["VerificationFlag"] == "UNVERIFIED"
    # QIDO-RS sees it in the study too.
    found = orthanc.get_json(
        f"/dicom-web/studies/{sr.StudyInstanceUID}/instances?SOPInstanceUID={sr.SOPInstanceUID}"
    )
    assert len(found) == 1
    # From a file path as well (same UID: no duplicate).
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert stow(path, StowDestination(orthanc.dicomweb_url + "/studies")).ok
    study = orthanc.get_json(f"/dicom-web/studies/{sr.StudyInstanceUID}/instances")
    assert [i["00080018"]["Value"][0] for i in study].count(sr.SOPInstanceUID) == 1
    assert pydicom.dcmread(path).SOPInstanceUID == sr.SOPInstanceUID


@pytest.mark.integration
def test_stow_http_error_is_permanent(orthanc: OrthancServer, sr: Dataset) -> None:
    with pytest.raises(StowError) as info:
        stow(sr, StowDestination(orthanc.http_url + "/no-such-dicomweb"))
    assert info.value.http_status == 404 and info.value.transient is False


@pytest.mark.integration
def test_stow_connection_refused_is_transient(sr: Dataset) -> None:
    with pytest.raises(StowError) as info:
        stow(sr, StowDestination(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5))
    assert info.value.transient is True and info.value.http_status is None
