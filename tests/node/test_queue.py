"""Job state machine, claiming, leases, heartbeat and expiry on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import job_admin
from node.db import jobs as jobs_db
from node.db import studies as studies_db
from node.db import study_completion as completion_db
from node.db import withdrawals as withdrawals_db
from node.db.models import Job, JobState, Study, StudyState
from node.settings import ChestRule
from tests.node.factories import T0, record, uid


def _queued_jobs(
    factory: sessionmaker[Session], n: int, *, priorities: list[int] | None = None
) -> list[int]:
    """Receive ``n`` one-instance chest studies and complete them: ``n`` queued jobs."""
    for i in range(n):
        with factory() as s:
            studies_db.record_instance(s, record(study=uid(), at=T0 + timedelta(milliseconds=i)))
    with factory() as s:
        done = completion_db.complete_quiet_studies(
            s, quiet_seconds=1, max_wait_seconds=60, now=T0 + timedelta(seconds=5), rule=ChestRule()
        )
    ids = [c.job_id for c in done if c.job_id is not None]
    assert len(ids) == n
    if priorities:
        with factory() as s:
            for job_id, p in zip(ids, priorities, strict=True):
                s.get_one(Job, job_id).priority = p
            s.commit()
    return ids


# --- state machine -------------------------------------------------------------------------


def _job(state: JobState) -> Job:
    return Job(id=7, state=state, attempts=0, max_attempts=3)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (JobState.received, JobState.running),
        (JobState.received, JobState.done),
        (JobState.queued, JobState.done),
        (JobState.queued, JobState.received),
        (JobState.done, JobState.queued),
        (JobState.done, JobState.running),
        (JobState.failed, JobState.running),
        (JobState.cancelled, JobState.done),
    ],
)
def test_illegal_transitions_are_refused(src: JobState, dst: JobState) -> None:
    job = _job(src)
    with pytest.raises(
        jobs_db.IllegalTransition,
        match=rf"job 7: illegal state transition {src.value} -> {dst.value}",
    ):
        jobs_db.transition(job, dst)
    assert job.state is src


def test_legal_path_sets_timestamps_and_clears_lease() -> None:
    job = _job(JobState.received)
    jobs_db.transition(job, "queued", now=T0)
    assert job.queued_at == T0 and job.state is JobState.queued
    jobs_db.transition(job, JobState.running, now=T0 + timedelta(seconds=1))
    job.lease_owner, job.lease_expires_at = "w1", T0
    jobs_db.transition(job, JobState.done, now=T0 + timedelta(seconds=2))
    assert job.finished_at == T0 + timedelta(seconds=2)
    assert job.lease_owner is None and job.lease_expires_at is None


def test_every_state_is_in_the_table() -> None:
    assert set(jobs_db.ALLOWED_TRANSITIONS) == set(JobState)
    assert jobs_db.ALLOWED_TRANSITIONS[JobState.done] == frozenset()


# --- claim, heartbeat, expiry ---------------------------------------------------------------


def test_claim_order_priority_then_age(session_factory: sessionmaker[Session]) -> None:
    ids = _queued_jobs(session_factory, 3, priorities=[0, 5, 0])
    got = []
    for _ in range(3):
        with session_factory() as s:
            job = jobs_db.claim_next_job(
                s, owner="w1", lease_seconds=30, now=T0 + timedelta(seconds=10)
            )
            assert job is not None
            assert job.state is JobState.running and job.attempts == 1 and job.lease_owner == "w1"
            assert job.lease_expires_at == T0 + timedelta(seconds=40)
            got.append(job.id)
    assert got == [ids[1], ids[0], ids[2]]
    with session_factory() as s:
        assert jobs_db.claim_next_job(s, owner="w1", lease_seconds=30) is None


def test_heartbeat_extends_only_own_lease(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = _queued_jobs(session_factory, 1)
    now = T0 + timedelta(seconds=10)
    with session_factory() as s:
        jobs_db.claim_next_job(s, owner="w1", lease_seconds=30, now=now)
    with session_factory() as s:
        assert jobs_db.heartbeat(s, job_id, "w1", 100, now=now + timedelta(seconds=20))
        assert not jobs_db.heartbeat(s, job_id, "intruder", 100, now=now)
    with session_factory() as s:
        assert s.get_one(Job, job_id).lease_expires_at == now + timedelta(seconds=120)
        # not expired at the old deadline any more
        assert jobs_db.expire_leases(s, now + timedelta(seconds=60)) == 0


def test_expired_lease_requeues_then_fails(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = _queued_jobs(session_factory, 1)
    with session_factory() as s:
        s.get_one(Job, job_id).max_attempts = 2
        s.commit()
    now = T0 + timedelta(seconds=10)
    for attempt in (1, 2):
        with session_factory() as s:
            job = jobs_db.claim_next_job(s, owner=f"w{attempt}", lease_seconds=30, now=now)
            assert job is not None and job.id == job_id and job.attempts == attempt
        now += timedelta(seconds=31)
        with session_factory() as s:
            assert jobs_db.expire_leases(s, now) == 1
            job = s.get_one(Job, job_id)
            assert "lease" in (job.last_error or "") and "expired" in (job.last_error or "")
            assert job.lease_owner is None
            assert job.state is (JobState.queued if attempt == 1 else JobState.failed)
    with session_factory() as s:
        assert jobs_db.claim_next_job(s, owner="w3", lease_seconds=30, now=now) is None
        # a lost lease cannot finish the job
        with pytest.raises(jobs_db.LeaseLost):
            withdrawals_db.finish_job(s, job_id, owner="w2")


def test_release_on_shutdown_does_not_count_attempt(session_factory: sessionmaker[Session]) -> None:
    ids = _queued_jobs(session_factory, 2)
    with session_factory() as s:
        jobs_db.claim_next_job(s, owner="me", lease_seconds=30)
        jobs_db.claim_next_job(s, owner="other", lease_seconds=30)
    with session_factory() as s:
        assert jobs_db.release_leases(s, "me") == 1
    with session_factory() as s:
        states = {j.id: (j.state, j.attempts, j.lease_owner) for j in s.scalars(select(Job))}
    released = [v for v in states.values() if v[0] is JobState.queued]
    assert released == [(JobState.queued, 0, None)]
    assert sorted(states) == sorted(ids)


def test_finish_and_fail(session_factory: sessionmaker[Session]) -> None:
    a, b = _queued_jobs(session_factory, 2)
    with session_factory() as s:
        j1 = jobs_db.claim_next_job(s, owner="w", lease_seconds=30)
        j2 = jobs_db.claim_next_job(s, owner="w", lease_seconds=30)
        assert j1 is not None and j2 is not None
        assert withdrawals_db.finish_job(s, j1.id, owner="w", sr_sop_instance_uid="1.2.3.4") is None
        done = s.get_one(Job, j1.id)
        assert done.state is JobState.done and done.sr_sop_instance_uid == "1.2.3.4"
        retried = jobs_db.fail_job(s, j2.id, owner="w", error="backend error")
        assert retried.state is JobState.queued and retried.last_error == "backend error"
        j2 = jobs_db.claim_next_job(s, owner="w", lease_seconds=30)
        assert j2 is not None
        failed = jobs_db.fail_job(s, j2.id, owner="w", error="bad image", retry=False)
        assert failed.state is JobState.failed
        requeued = job_admin.requeue_job(s, failed.id, actor="admin")
        assert requeued.state is JobState.queued and requeued.attempts == 0
    assert {a, b} == {j1.id, j2.id}


@pytest.mark.postgres
@pytest.mark.integration
def test_concurrent_claims_never_share_a_job(pg_schema_url: str) -> None:
    from node.db.engine import make_engine, make_session_factory
    from node.db.migrate import upgrade

    engine = make_engine(pg_schema_url, pool_size=8)
    upgrade(engine)
    factory = make_session_factory(engine)
    n_jobs, n_workers = 40, 6
    _queued_jobs(factory, n_jobs)
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(n_workers)}
    barrier = threading.Barrier(n_workers)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            barrier.wait()
            while True:
                with factory() as s:
                    job = jobs_db.claim_next_job(s, owner=name, lease_seconds=60)
                if job is None:
                    return
                claimed[name].append(job.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    all_ids = [i for ids in claimed.values() for i in ids]
    assert len(all_ids) == n_jobs
    assert len(set(all_ids)) == n_jobs
    with factory() as s:
        rows = s.scalars(select(Job)).all()
        assert all(j.state is JobState.running and j.attempts == 1 for j in rows)
        assert {j.lease_owner for j in rows} <= set(claimed)
    engine.dispose()


def test_sqlite_concurrent_claims_never_share_a_job(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from node.db.engine import make_engine, make_session_factory
    from node.db.migrate import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    upgrade(engine)
    factory = make_session_factory(engine)
    _queued_jobs(factory, 20)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with factory() as s:
                job = jobs_db.claim_next_job(
                    s, owner=threading.current_thread().name, lease_seconds=60
                )
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 20
    engine.dispose()


def test_job_exists_as_received_from_first_instance(
    session_factory: sessionmaker[Session], engine: Engine
) -> None:
    study = uid()
    with session_factory() as s:
        studies_db.record_instance(s, record(study=study))
    with session_factory() as s:
        st = s.scalars(select(Study).where(Study.study_instance_uid == study)).one()
        assert st.state is StudyState.receiving
        (job,) = s.scalars(select(Job).where(Job.study_id == st.id)).all()
        assert job.state is JobState.received
        # a received job is not claimable
        assert jobs_db.claim_next_job(s, owner="w", lease_seconds=10) is None


def test_admin_cancel_is_audited(session_factory: sessionmaker[Session]) -> None:
    from node.db.models import AuditLog

    (job_id,) = _queued_jobs(session_factory, 1)
    with session_factory() as s:
        job = job_admin.cancel_job(s, job_id, actor="admin:alice", reason="wrong patient routing")
        assert job.state is JobState.cancelled and job.finished_at is not None
        with pytest.raises(jobs_db.IllegalTransition, match="cancelled -> cancelled"):
            job_admin.cancel_job(s, job_id, actor="admin:alice")
        with pytest.raises(jobs_db.JobNotFound):
            job_admin.cancel_job(s, 10**6, actor="admin:alice")
    with session_factory() as s:
        (entry,) = s.scalars(select(AuditLog)).all()
        assert (entry.actor, entry.action, entry.target) == (
            "admin:alice",
            "job.cancel",
            f"job:{job_id}",
        )
        assert entry.detail == {
            "from": "queued",
            "to": "cancelled",
            "reason": "wrong patient routing",
        }
        assert s.get_one(Job, job_id).state is JobState.cancelled  # the refused move rolled back
