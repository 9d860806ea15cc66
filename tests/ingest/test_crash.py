"""Crash safety: SIGKILL ``cxr-node serve`` while a sender is mid-study, restart it; every
acknowledged instance is present (file + row) and the study becomes exactly one job."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.db.engine import make_engine, make_session_factory
from node.db.models import Instance, Job, Study
from tests.helpers import free_port, node_env, port_open, spawn_node, terminate, wait_for
from tests.ingest.conftest import NODE_AET, cxr_dataset, scu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_INSTANCES = 16
KILL_AFTER = 5


def test_sigkill_mid_study_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "node.sqlite3"
    spool = tmp_path / "spool"
    env = node_env(
        port,
        tmp_path,
        {
            "CXR_NODE_AE_TITLE": NODE_AET,
            "CXR_NODE_HOST": "127.0.0.1",
            "CXR_NODE_ALLOWED_AES": "PACS",
            "CXR_NODE_STUDY_QUIET_SECONDS": "3",
            "CXR_NODE_API_PORT": str(free_port()),
        },
    )
    log = tmp_path / "node.log"
    node = spawn_node(env, log, append=True)
    wait_for(lambda: port_open(port), timeout=120)

    study = generate_uid()
    series = generate_uid()
    datasets = [
        cxr_dataset(study_uid=study, series_uid=series, rows=512, cols=512, instance_number=i + 1)
        for i in range(N_INSTANCES)
    ]
    acked: list[str] = []
    done = threading.Event()

    def sender() -> None:
        ae = scu()
        deadline = time.monotonic() + 300
        for ds in datasets:
            while time.monotonic() < deadline:
                try:
                    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
                    if assoc.is_established:
                        rsp = assoc.send_c_store(ds)
                        ok = rsp is not None and "Status" in rsp and int(rsp.Status) == 0
                        assoc.release()
                        if ok:
                            acked.append(ds.SOPInstanceUID)
                            break
                except Exception:  # the node died under us: retry as a PACS would
                    pass
                time.sleep(0.2)
        done.set()

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    wait_for(lambda: len(acked) >= KILL_AFTER, timeout=120)
    node.send_signal(signal.SIGKILL)
    node.wait(timeout=30)
    killed_at = len(acked)
    assert killed_at < N_INSTANCES, "the node was killed after the study was complete"
    node = spawn_node(env, log, append=True)
    try:
        wait_for(lambda: port_open(port), timeout=120)
        assert done.wait(timeout=300)
        assert len(acked) == N_INSTANCES

        engine = make_engine(f"sqlite:///{db}")
        factory = make_session_factory(engine, read_only=True)

        def jobs() -> list[Job]:
            with factory() as s:
                return list(
                    s.scalars(
                        select(Job)
                        .join(Study, Job.study_id == Study.id)
                        .where(Study.study_instance_uid == study)
                    )
                )

        wait_for(lambda: [j.state.value for j in jobs()] == ["queued"], timeout=120)
        with factory() as s:
            rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
        for uid in acked:
            assert uid in rows, f"acknowledged instance {uid} lost"
            path = spool / rows[uid].spool_path
            assert hashlib.sha256(path.read_bytes()).hexdigest() == rows[uid].sha256
        assert len(jobs()) == 1
        engine.dispose()
    finally:
        terminate(node, timeout=60)
