"""The chores: study sweep and lease expiry through ``Chores``, retention with spool files."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import jobs as jobs_db
from node.db import studies as studies_db
from node.db import withdrawals as withdrawals_db
from node.db.deliveries import enqueue_deliveries
from node.db.models import (
    AuditLog,
    Delivery,
    DeliveryKind,
    DeliveryObject,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Study,
)
from node.runtime.scheduler import STALE_PART_SECONDS, Chores, NodeScheduler
from node.runtime.spool import OUTPUTS_DIR
from node.settings import load_settings
from tests.helpers import wait_for
from tests.node.factories import T0, record, uid


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _spool_instance(
    spool: Path, session_factory: sessionmaker[Session], study: str, at: datetime
) -> None:
    """One instance of ``study`` received at ``at``: its file in the spool, its row recorded."""
    rec = record(study=study, at=at)
    path = spool / rec.spool_path
    path.parent.mkdir(parents=True)
    path.write_bytes(b"pixels")
    with session_factory() as s:
        studies_db.record_instance(s, rec)


def _chores(tmp_path: Path, session_factory: sessionmaker[Session]) -> tuple[Path, Clock, Chores]:
    """Chores on a spool under ``tmp_path``: 5 s quiet period, 7 days' retention, clock at T0."""
    spool = tmp_path / "spool"
    settings = load_settings(spool_dir=spool, study_quiet_seconds=5, retention_days=7)
    clock = Clock(T0)
    return spool, clock, Chores(settings, session_factory, clock=clock)


def test_chores_sweep_expire_and_retention(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    spool, clock, chores = _chores(tmp_path, session_factory)
    old, recent = uid(), uid()
    for study, at in ((old, T0), (recent, T0 + timedelta(days=9))):
        _spool_instance(spool, session_factory, study, at)
    clock.now = T0 + timedelta(seconds=3)
    assert chores.sweep_studies() == []
    clock.now = T0 + timedelta(seconds=6)
    (done,) = chores.sweep_studies()
    assert done.study_uid == old
    with session_factory() as s:
        job = jobs_db.claim_next_job(s, owner="dead-worker", lease_seconds=10, now=clock.now)
        assert job is not None
    clock.now += timedelta(seconds=11)
    assert chores.expire_leases() == 1
    with session_factory() as s:
        job = jobs_db.claim_next_job(s, owner="w", lease_seconds=10, now=clock.now)
        assert job is not None
        withdrawals_db.finish_job(s, job.id, owner="w", now=clock.now)
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
        studies_db.record_instance(s, record(study=study, at=datetime.now(T0.tzinfo)))
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


def test_retention_removes_the_srs_of_purged_studies(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """SRs in ``outputs/`` go with their study; others stay; stale half-written SRs go."""
    spool, clock, chores = _chores(tmp_path, session_factory)
    outputs = spool / OUTPUTS_DIR
    outputs.mkdir(parents=True)
    srs: dict[str, str] = {}
    for study, at in ((uid(), T0), (uid(), T0 + timedelta(days=9))):
        _spool_instance(spool, session_factory, study, at)
        clock.now = at + timedelta(seconds=6)
        (done,) = chores.sweep_studies()
        srs[study] = uid()
        (outputs / f"{srs[study]}.dcm").write_bytes(b"sr")
        with session_factory() as s:
            job = jobs_db.claim_next_job(s, owner="w", lease_seconds=10, now=clock.now)
            assert job is not None and job.id == done.job_id
            # a delivery row names its own SR path, which need not be outputs/<SR UID>.dcm
            moved = f"{OUTPUTS_DIR}/moved-{srs[study]}.dcm"
            (spool / moved).write_bytes(b"sr")
            enqueue_deliveries(s, job_id=job.id, sr_path=moved, destinations=["PACS@h:104"])
            withdrawals_db.finish_job(
                s, job.id, owner="w", sr_sop_instance_uid=srs[study], now=clock.now
            )
    old, recent = srs
    # a half-written SR of a crashed worker, and one being written now
    stale, fresh = outputs / f".{uid()}.0badc0de.part", outputs / f".{uid()}.600dc0de.part"
    for part in (stale, fresh):
        part.write_bytes(b"partial")
    clock.now = T0 + timedelta(days=10)
    hour = clock.now.timestamp() - STALE_PART_SECONDS
    os.utime(stale, (hour - 1, hour - 1))
    os.utime(fresh, (hour + 60, hour + 60))

    assert chores.apply_retention() == 3  # the old study's instance, its SR and the moved copy
    left = sorted(p.name for p in outputs.iterdir())
    assert left == sorted([f"{srs[recent]}.dcm", f"moved-{srs[recent]}.dcm", fresh.name])
    with session_factory() as s:
        (entry,) = s.scalars(select(AuditLog).where(AuditLog.action == "retention.purge"))
        assert entry.detail is not None
        counts = [entry.detail[k] for k in ("studies", "instances", "srs")]
        assert counts == [1, 1, 2]
        assert s.scalar(select(func.count(Delivery.id))) == 1
    assert not (spool / old).exists() and (spool / recent).exists()
    # later the other study goes too; outputs/ stays, empty, for the workers that write there
    clock.now = T0 + timedelta(days=20)
    assert chores.apply_retention() == 3
    assert outputs.is_dir() and not any(outputs.iterdir())


def test_stale_sr_parts_go_even_without_retention(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    settings = load_settings(spool_dir=spool, retention_days=0)
    chores = Chores(settings, session_factory, clock=Clock(T0))
    part = spool / OUTPUTS_DIR / f".{uid()}.0badc0de.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"partial")
    old = T0.timestamp() - STALE_PART_SECONDS - 1
    os.utime(part, (old, old))
    keep = spool / OUTPUTS_DIR / f"{uid()}.dcm"
    keep.write_bytes(b"sr")
    os.utime(keep, (old, old))
    assert chores.apply_retention() == 0
    assert not part.exists() and keep.exists()


def test_retention_removes_sent_synthetic_captures_without_a_job(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    spool, _clock, chores = _chores(tmp_path, session_factory)
    outputs = spool / OUTPUTS_DIR
    outputs.mkdir(parents=True, exist_ok=True)
    for name in ("old-sent.dcm", "old-pending.dcm", "new-sent.dcm"):
        (outputs / name).write_bytes(b"DICM")
    with session_factory() as s:
        for name, state, age in (
            ("old-sent.dcm", DeliveryState.sent, 8),
            ("old-pending.dcm", DeliveryState.pending, 8),
            ("new-sent.dcm", DeliveryState.sent, 1),
        ):
            s.add(
                Delivery(
                    job_id=None,
                    destination="PACS@h:104",
                    kind=DeliveryKind.dimse,
                    object=DeliveryObject.sc,
                    state=state,
                    attempts=1,
                    sr_path=f"{OUTPUTS_DIR}/{name}",
                    created_at=T0 - timedelta(days=age),
                )
            )
        s.commit()
    assert chores.apply_retention() == 1
    assert sorted(p.name for p in outputs.iterdir()) == ["new-sent.dcm", "old-pending.dcm"]
    with session_factory() as s:
        left = sorted(str(d.sr_path) for d in s.scalars(select(Delivery)))
    assert left == [f"{OUTPUTS_DIR}/new-sent.dcm", f"{OUTPUTS_DIR}/old-pending.dcm"]
