"""The whole in-node path: C-STORE of a real CXR -> study complete -> worker -> SR on disk."""

from __future__ import annotations

import threading
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from node.db.engine import make_engine, make_session_factory
from node.db.models import Job, JobState
from node.runtime.modelhost import make_model_host
from node.runtime.worker import make_worker
from tests.helpers import free_port, node_thread, port_open, rg1_file, wait_for
from tests.worker.conftest import worker_settings


@pytest.mark.integration
def test_cstore_to_sr_through_run_node(tmp_path: Path, demo_bundle: Path) -> None:
    port = free_port()
    settings = worker_settings(
        db=f"sqlite:///{tmp_path / 'node.sqlite3'}",
        spool=tmp_path / "spool",
        model_dir=demo_bundle,
        port=port,
        api_port=free_port(),
        study_quiet_seconds=0.5,
        study_max_wait_seconds=60,
    )
    stop = threading.Event()
    t, result = node_thread(settings, stop, extra_components=[make_model_host, make_worker])
    engine = make_engine(settings.database_url)
    try:
        wait_for(lambda: port_open(port), timeout=60)
        ds = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
        ae = AE(ae_title="PACS")
        ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title=settings.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert int(status.Status) == 0x0000
        sf = make_session_factory(engine)

        def job_done() -> bool:
            with sf() as s:
                jobs = list(s.query(Job))
            return len(jobs) == 1 and jobs[0].state is JobState.done

        wait_for(job_done, timeout=120, interval=0.2)
        with sf() as s:
            job = s.query(Job).one()
        path = settings.spool_dir / "outputs" / f"{job.sr_sop_instance_uid}.dcm"
        sr = hd.sr.srread(path)
        assert sr.StudyInstanceUID == ds.StudyInstanceUID
        assert job.selected_sop_instance_uid == ds.SOPInstanceUID
    finally:
        stop.set()
        t.join(timeout=120)
        engine.dispose()
    assert result == [0]
