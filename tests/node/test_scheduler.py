"""The chores: study sweep and lease expiry through ``Chores``, retention with spool files."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import repository as repo
from node.db.models import AuditLog, Instance, Job, JobState, Study
from node.scheduler import Chores, NodeScheduler
from node.settings import load_settings
from tests.helpers import wait_for
from tests.node.factories import T0, record, uid


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_chores_sweep_expire_and_retention(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    settings = load_settings(spool_dir=spool, study_quiet_seconds=5, retention_days=7)
    clock = Clock(T0)
    chores = Chores(settings, session_factory, clock=clock)
    old, recent = uid(), uid()
    for study, at in ((old, T0), (recent, T0 + timedelta(days=9))):
        rec = record(study=study, at=at)
        path = spool / rec.spool_path
        path.parent.mkdir(parents=True)
        path.write_bytes(b"pixels")
        with session_factory() as s:
            repo.record_instance(s, rec)
    clock.now = T0 + timedelta(seconds=3)
    assert chores.sweep_studies() == []
    clock.now = T0 + timedelta(seconds=6)
    (done,) = chores.sweep_studies()
    assert done.study_uid == old
    with session_factory() as s:
        job = repo.claim_next_job(s, owner="dead-worker", lease_seconds=10, now=clock.now)
        assert job is not None
    clock.now += timedelta(seconds=11)
    assert chores.expire_leases() == 1
    with session_factory() as s:
        job = repo.claim_next_job(s, owner="w", lease_seconds=10, now=clock.now)
        assert job is not None
        repo.finish_job(s, job.id, owner="w", now=clock.now)
    # day 10: the old study is past retention; the recent one (day 9, still receiving) is not
    clock.now = T0 + timedelta(days=10)
    assert chores.apply_retention() == 1
    with session_factory() as s:
        uids = set(s.scalars(select(Study.study_instance_uid)))
        assert uids == {recent}
        assert s.scalar(select(func.count(Instance.id))) == 1
        assert s.scalar(select(func.count(Job.id))) == 1
        (entry,) = s.scalars(select(AuditLog).where(AuditLog.action == "retention.purge"))
        assert entry.detail is not None and entry.detail["studies"] == 1
    files = sorted(p.relative_to(spool).parts[0] for p in spool.rglob("*.dcm"))
    assert files == [recent]
    assert not (spool / old).exists()  # emptied directories are removed too


def test_scheduler_runs_the_sweep(session_factory: sessionmaker[Session], tmp_path: Path) -> None:
    settings = load_settings(spool_dir=tmp_path, study_quiet_seconds=0.2)
    study = uid()
    with session_factory() as s:
        repo.record_instance(s, record(study=study, at=datetime.now(T0.tzinfo)))
    sched = NodeScheduler(Chores(settings, session_factory))
    sched.start()
    try:

        def queued() -> bool:
            with session_factory() as s:
                return s.scalar(select(Job.state)) is JobState.queued

        wait_for(queued, timeout=20)
    finally:
        sched.stop()
    assert not sched.scheduler.running
