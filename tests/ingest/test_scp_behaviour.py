"""The node's SCP with a pynetdicom SCU: study assembly, duplicates and every refusal."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from integration.status import StoreStatus
from node.db.models import Study
from node.runtime.spool import Spool
from tests.ingest.conftest import (
    NODE_AET,
    PACS_AET,
    RunningSCP,
    complete_studies,
    cxr_dataset,
    scu,
    sha256,
    start_scp,
    store,
    store_file,
    study_jobs,
    write,
)

pytestmark = pytest.mark.integration


def test_multi_series_study_over_several_associations_one_job(scp: RunningSCP) -> None:
    study = generate_uid()
    series = [generate_uid() for _ in range(3)]
    sent = []
    for i, se in enumerate(series):  # one association per series
        batch = [
            cxr_dataset(study_uid=study, series_uid=se, series_number=i + 1, instance_number=j + 1)
            for j in range(2)
        ]
        assert store(scp, batch) == [0, 0]
        sent += batch
    assert len(scp.rows()) == 6
    complete_studies(scp, after=0.0)  # inside the 1 s quiet period: nothing queued
    assert [j.state.value for j in study_jobs(scp, study)] == ["received"]
    complete_studies(scp, after=scp.settings.study_quiet_seconds + 0.5)
    jobs = study_jobs(scp, study)
    assert [j.state.value for j in jobs] == ["queued"]
    complete_studies(scp, after=scp.settings.study_quiet_seconds + 5)  # idempotent
    assert len(study_jobs(scp, study)) == 1
    for ds in sent:
        assert pydicom.dcmread(scp.spooled(ds.SOPInstanceUID)).SOPInstanceUID == ds.SOPInstanceUID


def test_non_chest_study_stored_and_skipped(scp: RunningSCP) -> None:
    study = generate_uid()
    ds = cxr_dataset(study_uid=study, body_part="KNEE", modality="DX")
    ds.StudyDescription = "KNEE 2 VIEWS"
    assert store(scp, [ds]) == [0]
    assert scp.spooled(ds.SOPInstanceUID).is_file()
    complete_studies(scp, after=10)
    with scp.session_factory() as s:
        st = s.scalars(select(Study).where(Study.study_instance_uid == study)).one()
        assert st.state.value == "skipped" and st.skip_reason
    assert all(j.state.value == "cancelled" for j in study_jobs(scp, study))


def test_duplicates_identical_and_changed(sqlite_scp: RunningSCP) -> None:
    node = sqlite_scp
    ds = cxr_dataset()
    assert store(node, [ds]) == [0]
    first = node.spooled(ds.SOPInstanceUID)
    first_hash = sha256(first)
    assert store(node, [ds]) == [0]  # identical: success, nothing rewritten
    assert node.spooled(ds.SOPInstanceUID) == first and sha256(first) == first_hash
    assert len(node.spool_files()) == 1
    ds.SeriesDescription = "corrected"  # same SOP Instance UID, other content
    assert store(node, [ds]) == [0]
    second = node.spooled(ds.SOPInstanceUID)
    assert second != first and not first.exists()
    assert pydicom.dcmread(second).SeriesDescription == "corrected"
    assert node.spool_files() == [second]
    row = node.row(ds.SOPInstanceUID)
    assert row is not None and row.sha256 == sha256(second) and row.replaced_count == 1


def test_unknown_calling_ae_rejected(sqlite_scp: RunningSCP) -> None:
    assoc = scu("STRANGER").associate("127.0.0.1", sqlite_scp.port, ae_title=NODE_AET)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert rj is not None
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)
    assert sqlite_scp.rows() == []


def test_wrong_called_ae_rejected(sqlite_scp: RunningSCP) -> None:
    assoc = scu().associate("127.0.0.1", sqlite_scp.port, ae_title="NOTTHENODE")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert rj is not None
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 7)


def test_allowed_title_from_wrong_address_rejected(tmp_path: Path) -> None:
    node = start_scp(
        tmp_path, f"sqlite:///{tmp_path / 'n.sqlite3'}", allowed_aes="PACS@10.254.254.254,OTHER"
    )
    try:
        assoc = scu("PACS").associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None and rj.diagnostic == 3
        ok = scu("OTHER").associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert ok.is_established
        assert int(ok.send_c_echo().Status) == 0
        ok.release()
    finally:
        node.stop()


def _stored_then(node: RunningSCP) -> tuple[Path, str]:
    keep = cxr_dataset()
    assert store(node, [keep]) == [0]
    path = node.spooled(keep.SOPInstanceUID)
    return path, sha256(path)


def _unharmed(node: RunningSCP, path: Path, digest: str, n_rows: int = 1) -> None:
    assert path.is_file() and sha256(path) == digest
    assert len(node.rows()) == n_rows
    assert not list(node.spool.incoming.iterdir())


@pytest.mark.parametrize(
    ("drop", "status"),
    [
        ("SOPInstanceUID", StoreStatus.MISSING_SOP_INSTANCE_UID),
        ("StudyInstanceUID", StoreStatus.MISSING_STUDY_INSTANCE_UID),
        ("SeriesInstanceUID", StoreStatus.MISSING_SERIES_INSTANCE_UID),
    ],
)
def test_missing_uid_refused(
    sqlite_scp: RunningSCP,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    drop: str,
    status: StoreStatus,
) -> None:
    kept, digest = _stored_then(sqlite_scp)
    ds = cxr_dataset()
    delattr(ds, drop)
    path = write(ds, tmp_path / "bad.dcm")  # file meta still names the instance
    rsp = store_file(sqlite_scp, path, monkeypatch)
    assert int(rsp.Status) == status
    assert "UID" in str(rsp.ErrorComment)
    _unharmed(sqlite_scp, kept, digest)
    assert len(sqlite_scp.spool_files()) == 1


@pytest.mark.parametrize("cut", ["pixel", "header"])
def test_truncated_data_set_refused(
    sqlite_scp: RunningSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    kept, digest = _stored_then(sqlite_scp)
    full = write(cxr_dataset(rows=128, cols=128), tmp_path / "full.dcm").read_bytes()
    # "pixel": Pixel Data's length says 16384 but 1000 bytes are missing;
    # "header": the data set ends in the middle of an element header.
    data = full[:-1000] if cut == "pixel" else full + b"\x08\x00\x20"
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(data)
    rsp = store_file(sqlite_scp, bad, monkeypatch)
    assert int(rsp.Status) == StoreStatus.CANNOT_UNDERSTAND
    _unharmed(sqlite_scp, kept, digest)


def test_uid_mismatch_refused(
    sqlite_scp: RunningSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(cxr_dataset(), tmp_path / "x.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # request names another UID
    ds.save_as(path, enforce_file_format=False)
    rsp = store_file(sqlite_scp, path, monkeypatch)
    assert int(rsp.Status) == StoreStatus.UID_MISMATCH
    assert sqlite_scp.rows() == []


def test_free_space_floor_refuses_transiently(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'n.sqlite3'}"
    node = start_scp(tmp_path, url)
    try:
        kept, digest = _stored_then(node)
        node.sink.floor_bytes = node.spool.free_bytes() + (1 << 30)  # floor above free space
        ds = cxr_dataset()
        assert store(node, [ds]) == [StoreStatus.OUT_OF_RESOURCES_DISK]
        _unharmed(node, kept, digest)
        node.sink.floor_bytes = 0
        assert store(node, [ds]) == [0]  # the retry the transient status invites works
    finally:
        node.stop()


def _mount_tiny_tmpfs(target: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True
    )
    return r.returncode == 0


def test_full_filesystem_refuses_and_harms_nothing(tmp_path: Path) -> None:
    spool_dir = tmp_path / "tiny"
    if not _mount_tiny_tmpfs(spool_dir, "2m"):
        pytest.skip("cannot mount a tiny tmpfs here (needs root); the floor test covers 0xA700")
    try:
        node = start_scp(tmp_path, f"sqlite:///{tmp_path / 'n.sqlite3'}", spool=Spool(spool_dir))
        try:
            kept, digest = _stored_then(node)
            # each ~0.8 MB: the 2 MB filesystem fills within a few
            statuses = store(node, [cxr_dataset(rows=1000, cols=800) for _ in range(4)])
            assert statuses[0] == 0
            assert StoreStatus.OUT_OF_RESOURCES_DISK in statuses
            assert all(s in (0, StoreStatus.OUT_OF_RESOURCES_DISK) for s in statuses)
            n_ok = statuses.count(0)
            _unharmed(node, kept, digest, n_rows=1 + n_ok)
            assert len(node.spool_files()) == 1 + n_ok
            for r in node.rows():
                assert sha256(node.spool.root / r.spool_path) == r.sha256
        finally:
            node.stop()
    finally:
        subprocess.run(["umount", "-l", str(spool_dir)], check=False)


def test_database_down_refuses_and_leaves_no_file(tmp_path: Path) -> None:
    from tests.helpers import free_port

    closed = free_port()  # nothing listens there
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed}/test?connect_timeout=2"
    node = start_scp(tmp_path, url, migrate=False)
    try:
        ds = cxr_dataset()
        assert store(node, [ds]) == [StoreStatus.OUT_OF_RESOURCES_DATABASE]
        assert node.spool_files() == []
        assert not list(node.spool.incoming.iterdir())
    finally:
        node.stop()


def test_database_down_keeps_existing_identical_file(tmp_path: Path) -> None:
    """A resend during a database outage must not delete the file already recorded."""
    url = f"sqlite:///{tmp_path / 'n.sqlite3'}"
    node = start_scp(tmp_path, url)
    try:
        ds = cxr_dataset()
        assert store(node, [ds]) == [0]
        path = node.spooled(ds.SOPInstanceUID)
        digest = sha256(path)
        from node.db.engine import make_engine, make_session_factory
        from tests.helpers import free_port

        down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=2"
        node.sink.session_factory = make_session_factory(make_engine(down))
        assert store(node, [ds]) == [StoreStatus.OUT_OF_RESOURCES_DATABASE]
        assert path.is_file() and sha256(path) == digest
    finally:
        node.stop()


def test_rows_match_files_after_everything(scp: RunningSCP) -> None:
    batch = [cxr_dataset() for _ in range(3)]
    assert store(scp, batch) == [0, 0, 0]
    with scp.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 3
    for r in scp.rows():
        assert sha256(scp.spool.root / r.spool_path) == r.sha256


def test_max_associations_passed_through(tmp_path: Path) -> None:
    from integration.ae import build_storage_ae
    from integration.scp import handlers
    from tests.helpers import free_port

    node = start_scp(tmp_path, f"sqlite:///{tmp_path / 'n.sqlite3'}")
    port = free_port()
    ae = build_storage_ae(ae_title=NODE_AET, allowed_aes=["PACS"], max_associations=1)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers(node.sink))
    assert server is not None
    try:
        first = scu().associate("127.0.0.1", port, ae_title=NODE_AET)
        assert first.is_established
        second = scu().associate("127.0.0.1", port, ae_title=NODE_AET)
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert rj is not None and (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
        first.release()
    finally:
        server.shutdown()
        node.stop()


def test_the_nodes_own_draft_coming_back_does_not_reopen_the_study(
    sqlite_scp: RunningSCP,
) -> None:
    """A PACS that routes a study's objects to every node sends the node its own draft SR
    back. It is the node's object (``<spool>/outputs/<SOP Instance UID>.dcm``): answered
    0x0000 and not stored again, so the finished study is not reopened (before: a late
    instance, a fresh job, whose draft listed the SR as evidence and so got a new UID,
    was sent, came back, and so on)."""
    from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian
    from pynetdicom import AE

    from node.db import jobs as jobs_db
    from node.db import withdrawals as withdrawals_db
    from node.spool_layout import OUTPUTS_DIR
    from tests.helpers import node_draft_sr

    image = cxr_dataset()
    assert store(sqlite_scp, [image]) == [0]
    complete_studies(sqlite_scp, after=sqlite_scp.settings.study_quiet_seconds + 1)
    with sqlite_scp.session_factory() as s:
        job = jobs_db.claim_next_job(s, owner="test/w0", lease_seconds=60)
        assert job is not None
        withdrawals_db.finish_job(s, job.id, owner="test/w0")
    sr = node_draft_sr(
        image, findings="No effusion.", impression="Normal.", version="1.0", series_number=7001
    )
    outputs = sqlite_scp.spool.root / OUTPUTS_DIR
    outputs.mkdir(exist_ok=True)
    sr.save_as(outputs / f"{sr.SOPInstanceUID}.dcm", enforce_file_format=True)

    ae = AE(ae_title=PACS_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", sqlite_scp.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(sr).Status) == 0x0000
    finally:
        assoc.release()
    assert [j.state.value for j in study_jobs(sqlite_scp, image.StudyInstanceUID)] == ["done"]
    assert sqlite_scp.row(sr.SOPInstanceUID) is None


def test_a_nul_inside_a_text_attribute_is_stored_not_a_database_error(
    scp: RunningSCP,
) -> None:
    """A NUL inside a text value (pydicom strips only trailing padding; an old modality's
    fixed-width field) is no character of it: the image is stored (0x0000) on PostgreSQL as
    on SQLite, not answered 0xA701 "database error", which a PACS sends again for ever."""
    ds = cxr_dataset()
    ds.PatientName = "Test\x00^Ingest"
    ds.StudyDescription = "CHEST\x00 X-RAY"
    assert store(scp, [ds]) == [0]
    with scp.session_factory() as s:
        st = s.scalars(select(Study).where(Study.study_instance_uid == ds.StudyInstanceUID)).one()
        assert (st.patient_name, st.study_description) == ("Test^Ingest", "CHEST X-RAY")
