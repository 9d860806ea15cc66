"""``GET /api/system`` and the audit log's filters, through the running API (#26, item 5).

Real database (SQLite; one run on PostgreSQL), real spool, the real model host where the
model's state is checked: the figures must match what the test created.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from node.db import audit as audit_db
from node.db.models import Instance, Job, Study, StudyState, utcnow
from node.db.retention import purge_expired_studies
from node.db.system_views import hour_floor
from node.runtime.spool import Spool, SpoolFullError
from node.services.context import ServiceContext
from node.services.system import system_report
from tests.api.conftest import ApiEnv, EnvFactory

MIB = 1 << 20


def _system(env: ApiEnv) -> dict[str, Any]:
    with env.client("admin") as c:
        r = c.get("/api/system")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return dict(r.json())


def _received_hours(env: ApiEnv) -> Counter[str]:
    with env.sessions() as s:
        times = list(s.scalars(select(Instance.received_at)))
    return Counter(hour_floor(t).isoformat() for t in times)


def test_only_admins_see_the_system(make_env: EnvFactory) -> None:
    env = make_env(model=False)
    for role in ("viewer", "operator"):
        with env.client(role) as c:
            r = c.get("/api/system")
            assert r.status_code == 403, r.text
            assert "role admin required" in r.json()["detail"]
    with env.client() as c:
        assert c.get("/api/system").status_code == 401
    assert _system(env)["version"]


def test_figures_match_what_was_created(make_env: EnvFactory) -> None:
    env = make_env(model=False, retention_days=30, min_free_disk_mb=1)
    for _ in range(3):
        env.seed("received")
    env.seed("done")
    env.seed("failed")
    old = env.seed("received")  # received 30 h ago: outside the 24 h window
    with env.sessions() as s:
        s.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == old.sop_uid)
            .values(received_at=utcnow() - timedelta(hours=30))
        )
        s.commit()
    expected = _received_hours(env)
    data = _system(env)

    # instances and jobs per hour: 24 buckets, oldest first, the seeded ones in their hour
    hours = data["activity"]
    assert len(hours) == 24
    starts = [datetime.fromisoformat(h["hour"]) for h in hours]
    assert starts == sorted(starts) and starts[-1] == hour_floor(datetime.now(UTC))
    got = {h["hour"]: h["instances"] for h in hours if h["instances"]}
    assert got == {k: v for k, v in expected.items() if k in {h["hour"] for h in hours}}
    assert data["activity_totals"] == {"instances": 5, "jobs_done": 1, "jobs_failed": 1}
    assert sum(h["jobs_done"] for h in hours) == 1
    assert sum(h["jobs_failed"] for h in hours) == 1
    assert data["instances"] == 6
    # seeding "done" completed the quiet studies seeded before it (their jobs queued)
    assert {k: v for k, v in data["jobs"].items() if v} == {
        "received": 1,
        "queued": 3,
        "done": 1,
        "failed": 1,
    }

    # disks: the spool's file system as statvfs gives it, the floor, ingest accepting
    spool = env.settings.spool_dir.absolute()
    disks = {d["label"]: d for d in data["disks"]}
    assert {"spool", "staging", "database"} <= set(disks)
    assert disks["spool"]["path"] == str(spool)
    usage = shutil.disk_usage(spool)
    assert disks["spool"]["total_bytes"] == usage.total
    assert abs(disks["spool"]["free_bytes"] - usage.free) < 64 * MIB
    assert disks["spool"]["floor_bytes"] == MIB and data["min_free_disk_mb"] == 1
    assert disks["database"]["same_as"] == "spool"  # both under the test's tmp folder
    assert disks["staging"]["exists"] is (spool / ".incoming").is_dir()
    assert data["ingest_refuses"] is False and not disks["spool"]["refuses"]
    full = 1 - disks["spool"]["free_bytes"] / disks["spool"]["total_bytes"]
    assert disks["spool"]["full_fraction"] == pytest.approx(full)
    assert disks["spool"]["floor_fraction"] == pytest.approx(1 - MIB / usage.total)
    assert data["spool_dir"] == str(spool)
    with env.sessions() as s:
        recorded = sum(s.scalars(select(Instance.size_bytes)))
    assert data["spool_bytes"] == recorded > 0

    # database: the SQLite file (and its WAL), the schema revision
    db = data["database"]
    assert db["backend"] == "sqlite"
    path = env.settings.database_url.removeprefix("sqlite:///")
    assert db["file"] == str(os.path.abspath(path))
    assert db["size_bytes"] >= os.path.getsize(path) > 0
    assert db["schema_revision"]

    # retention: the settings, nothing purged yet; the model is not in this process
    ret = data["retention"]
    assert ret["retention_days"] == 30 and ret["enabled"] is True
    assert ret["last_purge_at"] is None and ret["last_purge"] is None
    assert ret["oldest_study_at"] is not None
    assert ret["receive_log_days"] == env.settings.receive_log_days
    assert ret["last_receive_log_purge_at"] is None
    assert data["model"]["state"] == "none"
    checks = {h["name"]: h for h in data["health"]}
    assert set(checks) == {"model", "database", "spool"}
    assert checks["database"]["ok"] and checks["spool"]["ok"] and not checks["model"]["ok"]
    assert data["ready"] is False
    assert data["uptime_seconds"] >= 0


def test_last_purge_is_shown_with_its_counts(make_env: EnvFactory) -> None:
    env = make_env(model=False, retention_days=30)
    gone = env.seed("done")
    env.seed("done")
    past = utcnow() - timedelta(days=40)
    with env.sessions() as s:
        s.execute(
            update(Study)
            .where(Study.study_instance_uid == gone.study_uid)
            .values(last_received_at=past, state=StudyState.complete)
        )
        s.commit()
    with env.sessions() as s:
        paths = purge_expired_studies(s, older_than=utcnow() - timedelta(days=30))
    assert paths
    purge = env.audit("retention.purge")
    assert len(purge) == 1 and purge[0].actor == "system"
    ret = _system(env)["retention"]
    assert ret["last_purge_at"] == purge[0].at.isoformat()
    assert ret["last_purge"]["studies"] == 1 and ret["last_purge"]["instances"] == 1
    with env.sessions() as s:
        assert s.scalar(select(Job.id).where(Job.id == gone.job_id)) is None


def test_ingest_refusal_follows_the_floor(make_env: EnvFactory) -> None:
    env = make_env(model=False)
    spool = env.settings.spool_dir
    free_mb = shutil.disk_usage(spool).free // MIB
    strict = env.settings.model_copy(update={"min_free_disk_mb": free_mb + 1024})
    report = system_report(
        ServiceContext(strict, env.api_ctx.read_sessions, env.api_ctx.write_sessions)
    )
    assert report.ingest_refuses
    spool_disk = next(d for d in report.disks if d.label == "spool")
    assert spool_disk.refuses and spool_disk.floor_bytes == (free_mb + 1024) * MIB
    # the real ingest check agrees: below this floor the spool refuses (0xA700)
    with pytest.raises(SpoolFullError):
        Spool(spool).check_free(0, floor_bytes=spool_disk.floor_bytes)
    assert not _system(env)["ingest_refuses"]


def test_model_state_and_warmup(env: ApiEnv) -> None:
    model = _system(env)["model"]
    assert model["state"] == "ready"
    assert model["warmup"] is True and model["demo"] is True
    assert model["loaded_at"] and model["load_seconds"] > 0
    assert model["name"]


def test_audit_filters_and_paging(make_env: EnvFactory) -> None:
    env = make_env(model=False)
    base = datetime(2030, 1, 2, 3, 0, tzinfo=UTC)
    with env.sessions() as s:
        for k in range(12):
            audit_db.add_audit(
                s,
                actor="alice" if k % 3 else "bob",
                action="job.requeue" if k % 2 else "job.cancel",
                target=f"job:{k}",
                detail={"n": k},
                now=base + timedelta(minutes=k),
            )
        s.commit()

    def page(**params: Any) -> dict[str, Any]:
        with env.client("admin") as c:
            r = c.get("/api/audit", params=params)
        assert r.status_code == 200, r.text
        return dict(r.json())

    bob = page(actor="bob")
    assert bob["total"] == 4 and [i["target"] for i in bob["items"]] == [
        "job:9",
        "job:6",
        "job:3",
        "job:0",
    ]
    assert page(actor="alice", action="job.cancel")["total"] == 4  # k = 2, 4, 8, 10
    assert page(target="job:7")["items"][0]["detail"] == {"n": 7}
    window = page(since=(base + timedelta(minutes=3)).isoformat(), until="2030-01-02T03:06:00")
    assert [i["target"] for i in window["items"]] == ["job:5", "job:4", "job:3"]  # until excl.
    first = page(actor="alice", limit=3, offset=0)
    second = page(actor="alice", limit=3, offset=3)
    assert first["total"] == second["total"] == 8
    assert [i["target"] for i in first["items"]] == ["job:11", "job:10", "job:8"]
    assert [i["target"] for i in second["items"]] == ["job:7", "job:5", "job:4"]
    assert page(actor="nobody")["total"] == 0
    with env.client("admin") as c:
        assert c.get("/api/audit", params={"until": "not a time"}).status_code == 422


@pytest.mark.integration
@pytest.mark.postgres
def test_system_on_postgresql(make_env: EnvFactory, pg_schema_url: str) -> None:
    env = make_env(url=pg_schema_url, model=False)
    env.seed("received")
    env.seed("done")
    data = _system(env)
    assert data["database"]["backend"] == "postgresql"
    assert data["database"]["size_bytes"] > 0 and data["database"]["file"] is None
    assert "database" not in {d["label"] for d in data["disks"]}
    got = {h["hour"]: h["instances"] for h in data["activity"] if h["instances"]}
    assert got == dict(_received_hours(env))
    assert data["activity_totals"]["jobs_done"] == 1
    with env.client("admin") as c:
        r = c.get("/api/audit", params={"action": "token.create", "until": "2000-01-01T00:00"})
    assert r.json()["total"] == 0


@pytest.mark.integration
@pytest.mark.parametrize(
    "path", ["/api/audit", "/api/jobs", "/api/receive-log", "/api/quality/summary"]
)
def test_a_time_outside_what_utc_holds_is_refused(
    make_env: EnvFactory,
    db_url: str,
    path: str,
) -> None:
    """``since``/``until`` with an offset that puts them before year 1 or after 9999 in UTC
    (valid ISO 8601, taken by the query's parser) are refused with 422 naming the time, not
    a 500 with a traceback; the edges themselves are served."""
    env = make_env(url=db_url, model=False)
    with env.client("admin") as c:
        for name, value in (
            ("since", "0001-01-01T00:00:00+01:00"),
            ("until", "9999-12-31T23:59:59-01:00"),
        ):
            r = c.get(path, params={name: value})
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert value in r.json()["detail"]
        for name, value in (("since", "0001-01-01T00:00:00Z"), ("until", "9999-12-31T23:59:59Z")):
            r = c.get(path, params={name: value})
            assert r.status_code == 200, (name, r.text)
