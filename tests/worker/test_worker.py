"""The worker and model-host components in-process: threads, leases, readiness errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from node.db import job_admin
from node.db import jobs as jobs_db
from node.db.models import JobState
from node.runtime.modelhost import ModelHost, ModelNotReady, make_model_host
from node.runtime.service import NodeContext
from node.runtime.stages import STAGE_DELAY_ENV, _parse_delays
from node.runtime.worker import Heartbeat, Worker, make_worker
from tests.helpers import wait_for
from tests.worker.conftest import NodeEnv, make_env, nih_pixels, worker_settings


def test_worker_threads_drain_the_queue(sqlite_env: NodeEnv, model_host: ModelHost) -> None:
    env = sqlite_env
    env.settings = env.settings.model_copy(update={"worker_concurrency": 2, "worker_batch_size": 2})
    for i in range(4):
        env.add_study(view="PA", pixels=nih_pixels(i, flip=i >= 2))
    env.add_study(view="LL", pixels=nih_pixels(0))  # fails permanently, loop goes on
    jobs = env.queue_all()
    ctx = env.context("node-a:1:0001")
    worker = Worker(ctx, model_host, poll_interval=0.1)
    assert worker.owners == ["node-a:1:0001/w0", "node-a:1:0001/w1"]
    worker.start()
    try:

        def settled() -> bool:
            return all(env.job(j).state in (JobState.done, JobState.failed) for j in jobs)

        wait_for(settled, timeout=120)
    finally:
        worker.stop()
    states = sorted(env.job(j).state.value for j in jobs)
    assert states == ["done"] * 4 + ["failed"]
    assert worker.counts["done"] == 4 and worker.counts["failed"] == 1
    assert all(len(env.drafts(j)) == (1 if env.job(j).state is JobState.done else 0) for j in jobs)


def test_worker_stop_releases_its_leases(sqlite_env: NodeEnv, model_host: ModelHost) -> None:
    env = sqlite_env
    env.add_study(view="PA", pixels=nih_pixels(0))
    [job_id] = env.queue_all()
    ctx = env.context("node-b:1:0002")
    worker = Worker(ctx, model_host)
    # a job claimed by this worker's thread owner and not finished (stop mid-way)
    assert worker.claim(worker.owners[0], 1) == [job_id]
    worker.stop()
    job = env.job(job_id)
    assert job.state is JobState.queued and job.lease_owner is None
    assert job.attempts == 0  # the interrupted attempt is not counted


def test_heartbeat_extends_and_detects_lost_lease(sqlite_env: NodeEnv) -> None:
    env = sqlite_env
    env.add_study(view="PA", pixels=nih_pixels(0))
    [job_id] = env.queue_all()
    with env.session_factory() as s:
        job = jobs_db.claim_next_job(s, owner="hb:1:1/w0", lease_seconds=0.6)
    assert job is not None
    first_expiry = job.lease_expires_at
    hb = Heartbeat(env.session_factory, [job_id], owner="hb:1:1/w0", lease_seconds=0.6).start()
    try:
        wait_for(lambda: env.job(job_id).lease_expires_at != first_expiry, timeout=10)
        assert not hb.lost(job_id)
        with env.session_factory() as s:  # an admin cancels the running job
            job_admin.cancel_job(s, job_id, actor="admin")
        wait_for(lambda: hb.lost(job_id), timeout=10)
    finally:
        hb.stop()


def test_model_host_reports_a_missing_bundle(tmp_path: Path) -> None:
    settings = worker_settings(
        db=f"sqlite:///{tmp_path / 'n.sqlite3'}", spool=tmp_path, model_dir=tmp_path / "absent"
    )
    ctx = NodeContext(settings, None, None, "o", threading.Event())  # type: ignore[arg-type]
    host = make_model_host(ctx)
    assert ctx.extras["model_host"] is host
    host.start()
    assert host.wait_ready(30) is False
    assert host.error is not None and "absent" in host.error
    with pytest.raises(ModelNotReady) as info:
        _ = host.runtime
    assert info.value.http_status == 503
    assert host.info()["ready"] is False and "absent" in host.info()["error"]
    worker = make_worker(ctx)  # a worker without a model claims nothing
    assert isinstance(worker, Worker)


def test_model_host_reports_a_bad_bundle(tmp_path: Path) -> None:
    bad = tmp_path / "bundle"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json", encoding="utf-8")
    settings = worker_settings(db="sqlite://", spool=tmp_path, model_dir=bad)
    host = ModelHost(settings)
    host.start()
    assert host.wait_ready(30) is False
    assert host.error is not None and "manifest.json" in host.error


def test_model_host_info_and_shared_use(model_host: ModelHost) -> None:
    info = model_host.info()
    assert info["ready"] is True and info["demo"] is True
    assert info["model_name"] == model_host.runtime.model_name
    assert info["backend"] == "transformers" and info["dtype"] == "float32"
    assert info["engine_version"].startswith("transformers ")
    assert info["cpu_features"] is None  # a llama.cpp backend's only
    assert info["loaded_at"] is not None
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with model_host.use():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(10)
    with pytest.raises(ModelNotReady, match="busy"), model_host.use(timeout=0.05):
        pass
    release.set()
    t.join()
    with model_host.use(timeout=5) as rt:
        assert rt is model_host.runtime


def test_worker_waits_for_a_model_that_never_loads(tmp_path: Path, demo_bundle: Path) -> None:
    env = make_env(f"sqlite:///{tmp_path / 'n.sqlite3'}", tmp_path, tmp_path / "missing")
    env.add_study(view="PA", pixels=nih_pixels(0))
    [job_id] = env.queue_all()
    ctx = env.context()
    host = make_model_host(ctx)
    host.start()
    worker = make_worker(ctx)
    worker.start()
    host.wait_ready(30)
    worker.stop()
    assert env.job(job_id).state is JobState.queued  # left for a worker with a model
    env.engine.dispose()


def test_stage_delay_hook_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parse_delays("generate:2.5, sr:1") == {"generate": 2.5, "sr": 1.0}
    with pytest.raises(ValueError, match=STAGE_DELAY_ENV):
        _parse_delays("decode:1")
