"""Several receiver processes on one port (``reuse_port``, #29): two ``cxr-node serve``
processes listen on the same port with ``SO_REUSEPORT`` and one spool and database; the kernel
spreads the associations of a sender between them, and every instance is recorded once."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, text

from node.settings import Settings
from tests.helpers import free_port, node_env, port_open, spawn_node, terminate, wait_for

pytestmark = [pytest.mark.integration]

ASSOCIATIONS = 16  # all on one receiver by chance: 2 in 2**16


def _listeners(port: int) -> int:
    """Sockets listening on ``port`` (``/proc/net/tcp``, state 0A)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(
        1 for line in lines if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
    )


def _instance(study: str, series: str) -> Dataset:
    """pydicom's small real CT with fresh UIDs in one study and series."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[tuple[int, list[Path]]]:
    port = free_port()
    shared = {
        "CXR_NODE_REUSE_PORT": "true",
        "CXR_NODE_SPOOL_SHARED": "true",
        "CXR_NODE_API_ENABLED": "false",
        "CXR_NODE_STUDY_QUIET_SECONDS": "3600",
        "CXR_NODE_STUDY_MAX_WAIT_SECONDS": "7200",
        "CXR_NODE_LOG_LEVEL": "INFO",
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "receiver-a.log", tmp_path / "receiver-b.log"]
    try:
        for k, log in enumerate(logs):
            procs.append(spawn_node(node_env(port, tmp_path, shared), log))
            # the first has made the database before the second starts
            wait_for(lambda n=k + 1: _listeners(port) == n, timeout=60)
        assert port_open(port)
        yield port, logs
    finally:
        for proc in procs:
            terminate(proc, timeout=30)


def test_two_receivers_share_one_port_and_record_every_instance(
    receivers: tuple[int, list[Path]], tmp_path: Path
) -> None:
    port, logs = receivers
    ae = AE("PACS")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    study, series = generate_uid(), generate_uid()
    sent = []
    for _ in range(ASSOCIATIONS):  # each association from a new source port
        ds = _instance(study, series)
        assoc = ae.associate("127.0.0.1", port, ae_title="LLMCXR")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000
        sent.append(ds.SOPInstanceUID)

    per_receiver = [log.read_text().count("C-STORE 0x0000") for log in logs]
    assert sum(per_receiver) == ASSOCIATIONS
    assert all(n > 0 for n in per_receiver), f"one receiver took every association: {per_receiver}"
    engine = create_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT sop_instance_uid FROM instances")).scalars().all()
        studies = conn.execute(text("SELECT instance_count FROM studies")).scalars().all()
    engine.dispose()
    assert sorted(rows) == sorted(sent)
    assert studies == [ASSOCIATIONS]  # one study, counted by both receivers
    spooled = list((tmp_path / "spool").glob("*/*/*.dcm"))
    assert len(spooled) == ASSOCIATIONS


def test_reuse_port_needs_a_shared_spool() -> None:
    with pytest.raises(ValueError, match="spool_shared"):
        Settings(reuse_port=True, spool_shared=False)
    assert Settings(reuse_port=True, spool_shared=True).reuse_port
