"""``cxr-node worker`` processes: SIGKILL mid-generation, two workers on one PostgreSQL.

The worker runs as a real subprocess (``python -m node.cli.worker``) configured through
``CXR_NODE_*`` variables. To kill it *during* generation deterministically, the first worker
gets ``CXR_NODE_TEST_STAGE_DELAY=generate:120`` (documented in :mod:`node.runtime.pipeline`): it
sleeps inside the generate stage, holding the model, after logging ``generating``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.db.models import JobState
from tests.helpers import REPO, wait_for
from tests.worker.conftest import NodeEnv, make_env, nih_pixels

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DESTS = "PACS@127.0.0.1:11113,ARCHIVE@127.0.0.1:11114"


class WorkerProcess:
    """A ``python -m node.cli.worker`` subprocess with its output collected."""

    def __init__(self, env: NodeEnv, *, extra: dict[str, str] | None = None) -> None:
        s = env.settings
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE_")}
        child_env.update(
            {
                "PYTHONPATH": str(REPO),
                "CXR_NODE_DATABASE_URL": s.database_url,
                "CXR_NODE_SPOOL_DIR": str(s.spool_dir),
                "CXR_NODE_MODEL_DIR": str(s.model_dir),
                "CXR_NODE_BACKEND_DTYPE": "float32",
                "CXR_NODE_BACKEND_THREADS": "1",
                "CXR_NODE_GENERATION_MAX_NEW_TOKENS": str(s.generation_max_new_tokens),
                "CXR_NODE_LEASE_SECONDS": str(s.lease_seconds),
                "CXR_NODE_WORKER_BATCH_SIZE": str(s.worker_batch_size),
                "CXR_NODE_MIN_FREE_DISK_MB": "0",
                "CXR_NODE_API_ENABLED": "false",
                "CXR_NODE_DESTINATIONS": ",".join(str(d) for d in s.destinations),
                **(extra or {}),
            }
        )
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli.worker"],
            cwd=REPO,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 120.0) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and not any(pattern in ln for ln in self.lines):
                pytest.fail(f"worker exited ({self.proc.returncode}):\n{self.output()}")
            return any(pattern in ln for ln in self.lines)

        wait_for(seen, timeout=timeout, interval=0.1)

    def claimed(self) -> list[int]:
        return [
            int(m.group(1)) for ln in self.lines if (m := re.search(r"job (\d+) claimed by", ln))
        ]

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def procs() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.kill()


def test_sigkill_mid_generation_then_another_worker_finishes(
    db_url: str, tmp_path: Path, demo_bundle: Path, procs: list[WorkerProcess]
) -> None:
    env = make_env(db_url, tmp_path, demo_bundle, lease_seconds=2.0, destinations=DESTS)
    try:
        env.add_study(view="PA")  # the real RG1 chest CR
        [job_id] = env.queue_all()
        first = WorkerProcess(env, extra={"CXR_NODE_TEST_STAGE_DELAY": "generate:120"})
        procs.append(first)
        first.wait_line(f"job {job_id}: generating")
        job = env.job(job_id)
        assert job.state is JobState.running and job.lease_owner
        first.kill()  # SIGKILL: no cleanup, the lease stays until it expires
        assert first.proc.returncode == -signal.SIGKILL
        assert env.job(job_id).state is JobState.running
        assert env.drafts(job_id) == []

        second = WorkerProcess(env)
        procs.append(second)
        wait_for(lambda: env.job(job_id).state is JobState.done, timeout=180, interval=0.2)
        assert second.stop() == 0, second.output()

        job = env.job(job_id)
        assert job.attempts == 2  # the killed attempt, then the one that finished
        expected = env.expected_sr_uid(job_id)
        assert job.sr_sop_instance_uid == expected
        assert (env.settings.spool_dir / "outputs" / f"{expected}.dcm").is_file()
        assert len(list((env.settings.spool_dir / "outputs").glob("*.dcm"))) == 1
        assert len(env.drafts(job_id)) == 1
        rows = env.deliveries(job_id)
        assert sorted(d.destination for d in rows) == sorted(DESTS.split(","))
        assert f"job {job_id} done" in second.output()
        assert second.claimed() == [job_id]
    finally:
        env.engine.dispose()


@pytest.mark.postgres
def test_two_workers_twenty_studies_on_postgresql(
    pg_schema_url: str, tmp_path: Path, demo_bundle: Path, procs: list[WorkerProcess]
) -> None:
    env = make_env(pg_schema_url, tmp_path, demo_bundle, lease_seconds=10.0, worker_batch_size=2)
    try:
        for i in range(20):
            env.add_study(view="PA", pixels=nih_pixels(i, side=128, flip=i % 4 >= 2))
        jobs = env.queue_all()
        assert len(jobs) == 20
        a, b = WorkerProcess(env), WorkerProcess(env)
        procs.extend([a, b])

        def all_done() -> bool:
            return all(env.job(j).state is JobState.done for j in jobs)

        wait_for(all_done, timeout=300, interval=0.5)
        assert a.stop() == 0, a.output()
        assert b.stop() == 0, b.output()

        claims = a.claimed() + b.claimed()
        assert sorted(claims) == sorted(jobs)  # each job claimed exactly once, none lost
        for j in jobs:
            job = env.job(j)
            assert job.attempts == 1 and job.sr_sop_instance_uid
            assert len(env.drafts(j)) == 1
        assert len({env.job(j).sr_sop_instance_uid for j in jobs}) == 20
    finally:
        env.engine.dispose()
