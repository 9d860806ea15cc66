"""The header reader: the attributes the node records, and refusal of broken data sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.status import StoreStatus
from node.runtime.dataset_error import DataSetError
from node.runtime.header import read_header
from node.runtime.spool import Spool
from tests.helpers import rg1_file
from tests.ingest.conftest import cxr_dataset, sha256, write


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_reads_real_cxr_headers(name: str) -> None:
    h = read_header(rg1_file(name))
    assert (h.modality, h.body_part_examined) == ("CR", "CHEST")
    assert h.sop_instance_uid.startswith("1.") and h.study_uid and h.series_uid


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
@pytest.mark.parametrize("cut", [1, 2, 100, 5000, 0.5])
def test_truncation_anywhere_in_pixel_data_refused(name: str, cut: float, tmp_path: Path) -> None:
    data = rg1_file(name).read_bytes()
    n = int(len(data) * cut) if cut < 1 else len(data) - int(cut)
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(data[:n])
    with pytest.raises(DataSetError) as info:
        read_header(bad)
    assert info.value.status == StoreStatus.CANNOT_UNDERSTAND


def test_a_value_with_a_backslash_is_its_text(tmp_path: Path) -> None:
    """A backslash in a string value is the value delimiter (PS3.5 6.2), so ``THORAX
    PA\\LAT`` reads as two values: the header keeps them as written, as the draft's
    outputs do (``integration.header_values.header_text``), not a Python list's text."""
    ds = cxr_dataset()
    ds.StudyDescription = "THORAX PA\\LAT"
    ds.AccessionNumber = "A1\\B2"
    h = read_header(write(ds, tmp_path / "two-values.dcm"))
    assert (h.study_description, h.accession_number) == ("THORAX PA\\LAT", "A1\\B2")
    # a priority rule matches the first value (docs/configuration.md, priority_rules)
    assert dict(h.rule_attributes)["StudyDescription"] == "THORAX PA"


def test_trailing_garbage_and_bad_length_refused(tmp_path: Path) -> None:
    good = write(cxr_dataset(), tmp_path / "ok.dcm").read_bytes()
    for i, data in enumerate([good + b"\x01\x02\x03", good[:-3]]):
        p = tmp_path / f"bad{i}.dcm"
        p.write_bytes(data)
        with pytest.raises(DataSetError):
            read_header(p)


def test_spool_identical_duplicate_keeps_file_and_changed_goes_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ds = cxr_dataset()
    uids = {
        "study_uid": ds.StudyInstanceUID,
        "series_uid": ds.SeriesInstanceUID,
        "sop_instance_uid": ds.SOPInstanceUID,
    }
    a = spool.store(write(ds, tmp_path / "a.dcm"), **uids)
    mtime = a.path.stat().st_mtime_ns
    b = spool.store(write(ds, tmp_path / "b.dcm"), **uids)
    assert b.already_present and b.path == a.path and a.path.stat().st_mtime_ns == mtime
    spool.discard(b)  # a refused identical resend must not delete the recorded file
    assert a.path.is_file() and sha256(a.path) == a.sha256
    ds.SeriesDescription = "other"
    c = spool.store(write(ds, tmp_path / "c.dcm"), **uids)
    assert c.path != a.path and a.path.is_file() and not c.already_present
    assert not list(spool.incoming.iterdir())
