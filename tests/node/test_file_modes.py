"""Issue #22, item 11: files holding patient data are 0600, their folders 0700.

Each test runs the real component (spool, SQLite engine, SR writer, demo PACS, settings'
start-up check) under a permissive umask (0022, the usual login default), so the modes come
from the node's explicit choices, not from the umask ``cxr-node serve`` sets. The whole
node with its umask is covered by ``tests/e2e/test_no_phi_in_logs.py``.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import text

from node.db.engine import make_engine
from node.demo import DemoPacs
from node.filemodes import PRIVATE_UMASK, apply_private_umask
from node.runtime.completion import write_sr
from node.runtime.spool import Spool
from node.settings import load_settings
from tests.helpers import node_draft_sr, rg1_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """Run each test under umask 0022 (files 0644, folders 0755 unless the node says so)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _tree(root: Path) -> dict[Path, int]:
    out = {root: _mode(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            out[Path(dirpath) / name] = _mode(Path(dirpath) / name)
    return out


def _private(tree: dict[Path, int]) -> list[str]:
    return [f"{oct(m)} {p}" for p, m in tree.items() if m != (0o700 if p.is_dir() else 0o600)]


def test_apply_private_umask_sets_0077() -> None:
    previous = apply_private_umask()
    try:
        assert previous == 0o022
        probe = os.umask(0o022)
        assert probe == PRIVATE_UMASK == 0o077
    finally:
        os.umask(previous)


def test_spool_files_and_folders_are_private(tmp_path: Path) -> None:
    """A received file made 0644 by its writer lands in the spool as 0600, folders 0700."""
    src = tmp_path / "received.dcm"
    ds = pydicom.dcmread(rg1_file())
    ds.save_as(src, enforce_file_format=True)
    assert _mode(src) == 0o644
    spool = Spool(tmp_path / "spool")
    spooled = spool.store(
        src,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
    assert _mode(spooled.path) == 0o600
    tree = _tree(tmp_path / "spool")
    assert (tmp_path / "spool" / ".incoming") in tree and len(tree) == 5, tree
    assert not _private(tree), _private(tree)


def test_prepare_runtime_tightens_an_existing_spool(tmp_path: Path) -> None:
    """A spool left 0755 by an earlier version is 0700 after start-up."""
    spool = tmp_path / "spool"
    spool.mkdir()
    assert _mode(spool) == 0o755
    settings = load_settings(None, spool_dir=spool, min_free_disk_mb=0, api_enabled=False)
    settings.prepare_runtime()
    assert _mode(spool) == 0o700
    fresh = load_settings(
        None, spool_dir=tmp_path / "new" / "spool", min_free_disk_mb=0, api_enabled=False
    )
    fresh.prepare_runtime()
    assert _mode(tmp_path / "new") == 0o700 and _mode(tmp_path / "new" / "spool") == 0o700


def test_sqlite_database_wal_and_shm_are_private(tmp_path: Path) -> None:
    db = tmp_path / "state" / "node.sqlite3"
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (report TEXT)"))
            conn.execute(text("INSERT INTO t VALUES ('x')"))
        names = {p.name for p in db.parent.iterdir()}
        assert {"node.sqlite3", "node.sqlite3-wal", "node.sqlite3-shm"} <= names, names
        assert not _private(_tree(db.parent)), _private(_tree(db.parent))
    finally:
        engine.dispose()


def test_existing_world_readable_database_is_tightened(tmp_path: Path) -> None:
    """A database an earlier version created 0644 (with its -wal) becomes 0600."""
    db = tmp_path / "node.sqlite3"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (a)")
        conn.commit()
        wal = tmp_path / "node.sqlite3-wal"
        assert _mode(db) == 0o644 and _mode(wal) == 0o644
        engine = make_engine(f"sqlite:///{db}")
        engine.dispose()
        assert _mode(db) == 0o600 and _mode(wal) == 0o600


def _draft_sr() -> pydicom.Dataset:
    header = pydicom.dcmread(rg1_file(), stop_before_pixels=True)
    return node_draft_sr(
        header,
        findings=None,
        impression="No acute findings.",
        version="test",
        sop_instance_uid="2.25.1001",
        series_instance_uid="2.25.1002",
        series_number=9900,
        instance_number=1,
    )


def test_sr_file_and_outputs_folder_are_private(tmp_path: Path) -> None:
    sr = _draft_sr()
    outputs = tmp_path / "spool" / "outputs"
    path = write_sr(sr, outputs)
    assert _mode(path) == 0o600
    assert _mode(outputs) == 0o700 and _mode(outputs.parent) == 0o700
    assert [p.name for p in outputs.iterdir()] == [path.name]  # no temporary file left


def test_demo_pacs_inbox_is_private(tmp_path: Path) -> None:
    """The demo's stand-in PACS keeps what it receives (SRs with patient data) 0600/0700."""
    pacs = DemoPacs(tmp_path / "pacs-inbox")
    pacs.start()
    try:
        ds = _draft_sr()
        ae = AE(ae_title="NODE")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title=pacs.ae_title)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        assert int(status.Status) == 0x0000
        received = pacs.wait_for(30)
        assert received is not None
    finally:
        pacs.stop()
    assert _mode(received) == 0o600
    assert not _private(_tree(tmp_path / "pacs-inbox"))
