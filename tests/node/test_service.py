"""``cxr-node serve``: ready on its port, answers C-ECHO (DCMTK and our own echo), stores,
queues after the quiet period, and stops cleanly on SIGTERM (exit 0, leases released)."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli import app
from node.db import jobs as jobs_db
from node.db import studies as studies_db
from node.db import study_completion as completion_db
from node.db import views as views_db
from node.db.engine import make_engine, make_session_factory
from node.db.models import Job, JobState
from node.runtime.service import NodeContext
from node.settings import ChestRule, load_settings
from tests.helpers import (
    REPO,
    free_port,
    node_env,
    node_thread,
    port_open,
    require_binary,
    spawn_node,
    wait_for,
)
from tests.node.factories import T0, record, uid


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    return node_env(
        port,
        tmp_path,
        {
            "PYTHONPATH": str(REPO),
            "CXR_NODE_AE_TITLE": "NODETEST",
            "CXR_NODE_STUDY_QUIET_SECONDS": "0.5",
            "CXR_NODE_API_PORT": str(free_port()),
        },
    )


def _scu(
    tool: str, called: str, port: int, *files: str, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run DCMTK ``tool`` (echoscu, storescu) as TESTSCU against ``called`` on ``port``.

    Parameters
    ----------
    tool
        The binary's path.
    called
        Called AE Title.
    port
        The node's port on 127.0.0.1.
    *files
        Files to send (storescu).
    timeout
        Seconds before :class:`subprocess.TimeoutExpired`.

    Returns
    -------
    subprocess.CompletedProcess
        Its exit code and captured output.
    """
    return subprocess.run(
        [tool, "-aet", "TESTSCU", "-aec", called, "127.0.0.1", str(port), *files],
        capture_output=True,
        timeout=timeout,
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, dict[str, str]]]:
    port = free_port()
    env = _env(tmp_path, port)
    proc = spawn_node(env, tmp_path / "serve.log", cwd=tmp_path)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=60)
        if proc.poll() is not None:
            pytest.fail(f"serve exited early:\n{(tmp_path / 'serve.log').read_text()}")
        yield proc, port, env
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_serve_answers_echo_and_stops_on_sigterm(
    served: tuple[subprocess.Popen[bytes], int, dict[str, str]], tmp_path: Path
) -> None:
    proc, port, env = served
    echoscu = require_binary("echoscu")
    ok = _scu(echoscu, "NODETEST", port)
    assert ok.returncode == 0, ok.stderr.decode()
    wrong = _scu(echoscu, "WRONGAE", port)
    assert wrong.returncode != 0  # called AE title must match
    res = CliRunner().invoke(app, ["echo", f"NODETEST@127.0.0.1:{port}"], env=env)
    assert res.exit_code == 0, res.output
    status = CliRunner().invoke(app, ["status", "--json"], env=env)
    assert status.exit_code == 0 and '"instances": 0' in status.stdout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "node ready" in log and "NODETEST" in log and "node stopped" in log
    assert "effective configuration" in log
    assert not port_open(port)


@pytest.mark.integration
def test_serve_stores_and_queues_a_chest_study(
    served: tuple[subprocess.Popen[bytes], int, dict[str, str]], tmp_path: Path
) -> None:
    from tests.helpers import rg1_file

    proc, port, env = served
    storescu = require_binary("storescu")
    src = rg1_file("RG1_UNCR.dcm")
    sent = _scu(storescu, "NODETEST", port, str(src), timeout=120)
    assert sent.returncode == 0, sent.stderr.decode()
    engine = make_engine(env["CXR_NODE_DATABASE_URL"])
    factory = make_session_factory(engine, read_only=True)

    def job_settled() -> bool:
        with factory() as s:
            state = s.scalar(select(Job.state))
        return state in (JobState.queued, JobState.cancelled)

    wait_for(job_settled, timeout=30)
    with factory() as s:
        counts = views_db.counts(s)
    engine.dispose()
    assert counts.instances == 1 and counts.studies == 1
    assert counts.jobs["queued"] == 1  # RG1_UNCR is a CR with Body Part Examined CHEST
    (spooled,) = (tmp_path / "spool").rglob("*.dcm")
    assert counts.spool_bytes == spooled.stat().st_size > 7_000_000
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0


@pytest.mark.integration
def test_sigterm_lets_an_established_association_finish(
    served: tuple[subprocess.Popen[bytes], int, dict[str, str]], tmp_path: Path
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    proc, port, _ = served
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="NODETEST")
    assert assoc.is_established
    try:
        proc.send_signal(signal.SIGTERM)
        # the node stops listening but keeps serving the open association
        log_file = tmp_path / "serve.log"
        wait_for(lambda: "in-flight associations" in log_file.read_text(), timeout=30)
        assert proc.poll() is None
        assert not port_open(port)
        status = assoc.send_c_echo()
        assert status is not None and int(status.Status) == 0x0000
    finally:
        assoc.release()
        ae.shutdown()
    assert proc.wait(timeout=60) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "in-flight associations" in log and "aborting association" not in log


class _Recorder:
    def __init__(self, events: list[str], name: str) -> None:
        self.events, self.name = events, name

    def start(self) -> None:
        self.events.append(f"start {self.name}")

    def stop(self) -> None:
        self.events.append(f"stop {self.name}")


@pytest.mark.integration
def test_run_node_components_and_lease_release(tmp_path: Path, db_url: str) -> None:
    port = free_port()
    settings = load_settings(
        port=port,
        api_port=free_port(),
        database_url=db_url,
        spool_dir=tmp_path / "spool",
        min_free_disk_mb=0,
        study_quiet_seconds=1000,
        study_max_wait_seconds=2000,
    )
    events: list[str] = []
    claimed: dict[str, int] = {}
    stop = threading.Event()

    def worker_factory(ctx: NodeContext) -> _Recorder:
        # a component that claims a job with the node's owner id, as the worker will
        with ctx.session_factory() as s:
            studies_db.record_instance(s, record(study=uid(), at=T0))
            completion_db.complete_quiet_studies(
                s,
                quiet_seconds=1,
                max_wait_seconds=10,
                now=T0 + timedelta(seconds=5),
                rule=ChestRule(),
            )
            job = jobs_db.claim_next_job(s, owner=ctx.owner, lease_seconds=600)
            assert job is not None
            claimed["id"] = job.id
        return _Recorder(events, "worker")

    t, result = node_thread(
        settings, stop, extra_components=[_Recorder(events, "api"), worker_factory]
    )
    try:
        wait_for(lambda: port_open(port) and len(events) == 2, timeout=60)
    finally:
        stop.set()
        t.join(timeout=120)
    assert result == [0]
    assert events == ["start api", "start worker", "stop worker", "stop api"]
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as s:
        job = s.get_one(Job, claimed["id"])
        assert job.state is JobState.queued and job.lease_owner is None and job.attempts == 0
        assert "released" in (job.last_error or "")
    engine.dispose()
    assert not port_open(port)
