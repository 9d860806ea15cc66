"""The reusable Orthanc fixture (tests/dicom/orthanc.py): PACS -> peer forwarding works."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.dicom.conftest import StoreSCP
from tests.dicom.orthanc import OrthancServer
from tests.helpers import rg1_file


@pytest.mark.integration
def test_orthanc_forwards_to_modality(tmp_path: Path, dcmtk_storescp: StoreSCP) -> None:
    modalities = {"NODE": (dcmtk_storescp.aet, "127.0.0.1", dcmtk_storescp.port)}
    with OrthancServer(tmp_path / "pacs", modalities=modalities) as pacs:
        assert pacs.running
        assert pacs.get_json("/system")["DicomAet"] == pacs.aet
        assert pacs.get_json("/modalities") == ["NODE"]
        source = pydicom.dcmread(rg1_file(), stop_before_pixels=True)
        orthanc_id = pacs.upload(rg1_file())
        assert pacs.wait_for_instance(source.SOPInstanceUID) == orthanc_id
        assert [t["SOPInstanceUID"] for t in pacs.study_instances(source.StudyInstanceUID)] == [
            source.SOPInstanceUID
        ]
        pacs.send_to_modality("NODE", [orthanc_id])
    assert not pacs.running
    received = list(dcmtk_storescp.out_dir.iterdir())
    assert len(received) == 1
    assert pydicom.dcmread(received[0], stop_before_pixels=True).SOPInstanceUID == (
        source.SOPInstanceUID
    )
