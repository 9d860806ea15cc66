"""Two node hosts and a remote engine (#29): two receivers (``cxr-node serve --no-worker``)
and two workers (``cxr-node worker``, ``backend = "remote"``) on one PostgreSQL and one
shared spool, one ``cxr-node engine`` for both workers. A burst of studies goes to both
receivers; one receiver is SIGKILLed with an association open while the other keeps
accepting. Every acknowledged study is drafted exactly once; none is lost or drafted twice.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ComputedRadiographyImageStorage, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from node.db.models import Draft, Job, JobState, Study
from tests.helpers import free_port, node_env, port_open, rg1_file, spawn_node, wait_for
from tests.llamacpp.conftest import require_engine, start_engine
from tests.worker.conftest import make_env
from tests.worker.test_processes import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

NODE_AET = "LLMCXR"


class Receiver:
    """A ``cxr-node serve --no-worker``-like receiver: no model_dir, so no worker."""

    def __init__(self, work: Path, db_url: str, spool: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = node_env(
            self.port,
            work,
            {
                "CXR_NODE_DATABASE_URL": db_url,
                "CXR_NODE_SPOOL_DIR": str(spool),
                "CXR_NODE_SPOOL_SHARED": "true",
                "CXR_NODE_AE_TITLE": NODE_AET,
                "CXR_NODE_HOST": "127.0.0.1",
                "CXR_NODE_API_ENABLED": "false",
                "CXR_NODE_STUDY_QUIET_SECONDS": "1",
                "CXR_NODE_STUDY_MAX_WAIT_SECONDS": "5",
            },
        )
        self.log = work / "node.log"
        self.proc = spawn_node(env, self.log)
        deadline = time.monotonic() + 60
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"receiver did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _study(tmp: Path, n: int) -> Path:
    ds = dcmread(rg1_file())
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ViewPosition = "PA"
    path = tmp / f"study-{n}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _scu() -> AE:
    ae = AE("PACS")
    ts = dcmread(rg1_file(), stop_before_pixels=True).file_meta.TransferSyntaxUID
    ae.add_requested_context(ComputedRadiographyImageStorage, [ts])
    return ae


@pytest.fixture
def processes() -> Iterator[list[object]]:
    started: list[object] = []
    yield started
    for p in started:
        if isinstance(p, Receiver):
            p.stop()
        elif isinstance(p, WorkerProcess):
            if p.proc.poll() is None:
                p.kill()
        elif isinstance(p, subprocess.Popen) and p.poll() is None:
            p.kill()


def test_two_hosts_and_a_remote_engine_draft_a_burst_once_each(
    pg_schema_url: str, tmp_path: Path, demo_bundle: Path, processes: list[object]
) -> None:
    require_engine()
    from models.gguf_convert import convert_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    convert_bundle(bundle, quant="f32", threads=1)
    engine_port = free_port()
    processes.append(start_engine(bundle, engine_port))
    env = make_env(pg_schema_url, tmp_path, bundle, lease_seconds=10.0)
    try:
        spool = env.settings.spool_dir
        a = Receiver(tmp_path / "host-a", env.settings.database_url, spool)
        b = Receiver(tmp_path / "host-b", env.settings.database_url, spool)
        processes.extend([a, b])
        remote = {
            "CXR_NODE_BACKEND": "remote",
            "CXR_NODE_REMOTE_URLS": f"http://127.0.0.1:{engine_port}",
        }
        workers = [WorkerProcess(env, extra=remote), WorkerProcess(env, extra=remote)]
        processes.extend(workers)

        files = [_study(tmp_path, n) for n in range(9)]
        acknowledged: list[str] = []
        ae = _scu()
        # host A: three studies, then it dies with the association still open
        assoc = ae.associate("127.0.0.1", a.port, ae_title=NODE_AET)
        assert assoc.is_established
        for f in files[:3]:
            status = assoc.send_c_store(f)
            assert status.Status == 0x0000
            acknowledged.append(str(dcmread(f, stop_before_pixels=True).StudyInstanceUID))
        a.proc.kill()
        a.proc.wait(timeout=10)
        try:  # to a dead receiver: no Success
            lost = assoc.send_c_store(files[3])
            assert getattr(lost, "Status", None) != 0x0000
        except RuntimeError:
            pass  # pynetdicom: the association is no longer established
        assoc.release()
        # host B keeps accepting: the rest of the burst, over two associations
        for chunk in (files[4:7], files[7:]):
            assoc = ae.associate("127.0.0.1", b.port, ae_title=NODE_AET)
            assert assoc.is_established
            for f in chunk:
                assert assoc.send_c_store(f).Status == 0x0000
                acknowledged.append(str(dcmread(f, stop_before_pixels=True).StudyInstanceUID))
            assoc.release()

        def drafted() -> dict[str, int]:
            with env.session_factory() as s:
                rows = s.execute(
                    select(Study.study_instance_uid, func.count(Draft.id))
                    .join(Job, Job.study_id == Study.id)
                    .join(Draft, Draft.job_id == Job.id)
                    .where(Job.state == JobState.done)
                    .group_by(Study.study_instance_uid)
                )
                return {str(uid): int(n) for uid, n in rows}

        wait_for(lambda: set(acknowledged) <= set(drafted()), timeout=300, interval=0.5)
        for w in workers:
            assert w.stop() == 0, w.output()
        done = drafted()
        assert all(done[uid] == 1 for uid in acknowledged), done  # none drafted twice
        assert len(acknowledged) == 8
        claims = workers[0].claimed() + workers[1].claimed()
        assert len(claims) == len(set(claims)) == len(acknowledged)  # each claimed once
        with env.session_factory() as s:
            failed = s.scalar(select(func.count(Job.id)).where(Job.state == JobState.failed))
        assert failed == 0
    finally:
        env.engine.dispose()
