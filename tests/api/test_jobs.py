"""Job routes on a running API with a real SQLite database: every action, audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from node.db.models import Job, JobState, utcnow
from node.services.tokens import create_token
from tests.api.conftest import LAST_ATTEMPT, ApiEnv, EnvFactory
from tests.node.factories import add_redraft

pytestmark = pytest.mark.integration


def test_list_and_filter(env: ApiEnv) -> None:
    queued = env.seed("queued")
    failed = env.seed("failed")
    done = env.seed("done", destination="PACS@10.0.0.5:104")
    with env.client("viewer") as c:
        page = c.get("/api/jobs").json()
        assert page["total"] == 3
        assert [j["id"] for j in page["items"]] == [done.job_id, failed.job_id, queued.job_id]
        assert [
            j["id"] for j in c.get("/api/jobs", params={"state": "failed"}).json()["items"]
        ] == [failed.job_id]
        both = c.get("/api/jobs", params=[("state", "failed"), ("state", "queued")]).json()
        assert {j["id"] for j in both["items"]} == {failed.job_id, queued.job_id}
        by_study = c.get("/api/jobs", params={"study_uid": queued.study_uid}).json()
        assert [j["study_uid"] for j in by_study["items"]] == [queued.study_uid]
        by_dest = c.get("/api/jobs", params={"destination": "PACS@10.0.0.5:104"}).json()
        assert [j["id"] for j in by_dest["items"]] == [done.job_id]
        assert c.get("/api/jobs", params={"destination": "OTHER@h:1"}).json()["total"] == 0
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        assert c.get("/api/jobs", params={"since": future}).json()["total"] == 0
        assert c.get("/api/jobs", params={"since": past, "until": future}).json()["total"] == 3
        assert c.get("/api/jobs", params={"until": past}).json()["total"] == 0
        paged = c.get("/api/jobs", params={"limit": 1, "offset": 1}).json()
        assert paged["total"] == 3 and [j["id"] for j in paged["items"]] == [failed.job_id]
        assert c.get("/api/jobs", params={"state": "bogus"}).status_code == 422
        assert c.get("/api/jobs", params={"limit": 0}).status_code == 422


def test_job_detail(env: ApiEnv) -> None:
    done = env.seed("done", draft="No acute cardiopulmonary process.", destination="PACS@h:104")
    with env.client("viewer") as c:
        d = c.get(f"/api/jobs/{done.job_id}").json()
        assert d["job"]["state"] == "done"
        assert d["job"]["sr_uid"] == env.job(done.job_id).sr_sop_instance_uid
        assert d["job"]["sr_uid"]
        assert d["selected_sop_instance_uid"] == done.sop_uid
        assert d["draft"]["text"] == "No acute cardiopulmonary process."
        assert d["draft"]["demo"] is True
        assert d["timings"]["decode_s"] == 0.5
        names = [s["name"] for s in d["stages"]]
        assert names[:4] == ["received", "queued", "started", "finished"]
        assert all(s["at"] for s in d["stages"][:4])
        assert d["stages"][0]["seconds"] is not None and d["stages"][0]["seconds"] >= 0
        assert d["deliveries"][0]["destination"] == "PACS@h:104"
        assert d["deliveries"][0]["attempts"] == 8
        assert d["deliveries"][0]["last_error"] == "association rejected"
        assert datetime.fromisoformat(d["deliveries"][0]["last_attempt_at"]) == LAST_ATTEMPT
        r = c.get("/api/jobs/424242")
        assert r.status_code == 404 and "424242" in r.json()["detail"]


def test_retry(env: ApiEnv) -> None:
    failed = env.seed("failed")
    queued = env.seed("queued")
    with env.client("operator") as c:
        r = c.post(f"/api/jobs/{failed.job_id}/retry")
        assert r.status_code == 200
        assert r.json()["state"] == "queued" and r.json()["attempts"] == 0
        r = c.post(f"/api/jobs/{queued.job_id}/retry")
        assert r.status_code == 409
        assert "illegal state transition queued -> queued" in r.json()["detail"]
        assert c.post("/api/jobs/999999/retry").status_code == 404
    audit = env.audit("job.requeue")
    assert len(audit) == 1
    assert audit[0].actor == env.actor("operator")
    assert audit[0].target == f"job:{failed.job_id}"
    assert audit[0].detail is not None and audit[0].detail["from"] == "failed"
    assert audit[0].at is not None
    with env.client("viewer") as c:
        trail = c.get(f"/api/jobs/{failed.job_id}").json()["audit"]
        assert [a["action"] for a in trail] == ["job.requeue"]
        listed = c.get("/api/audit", params={"action": "job.requeue"}).json()
        assert listed["total"] == 1 and listed["items"][0]["actor"] == env.actor("operator")


def test_cancel(env: ApiEnv) -> None:
    queued = env.seed("queued")
    done = env.seed("done")
    with env.client("operator") as c:
        r = c.post(f"/api/jobs/{queued.job_id}/cancel", json={"reason": "duplicate order"})
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert r.json()["last_error"] == "duplicate order"
        r = c.post(f"/api/jobs/{done.job_id}/cancel")
        assert r.status_code == 409
        r = c.post(f"/api/jobs/{queued.job_id}/cancel", json={"reason": "x" * 501})
        assert r.status_code == 422
    assert env.job(done.job_id).state.value == "done"
    audit = env.audit("job.cancel")
    assert [(a.target, a.actor) for a in audit] == [(f"job:{queued.job_id}", env.actor("operator"))]
    assert audit[0].detail == {"from": "queued", "to": "cancelled", "reason": "duplicate order"}


def test_reprioritise(env: ApiEnv) -> None:
    queued = env.seed("queued")
    with env.client("operator") as c:
        r = c.post(f"/api/jobs/{queued.job_id}/priority", json={"priority": 7})
        assert r.status_code == 200 and r.json()["priority"] == 7
        assert c.post(f"/api/jobs/{queued.job_id}/priority", json={}).status_code == 422
        r = c.post(f"/api/jobs/{queued.job_id}/priority", json={"priority": 10**6})
        assert r.status_code == 422
        assert c.post("/api/jobs/999999/priority", json={"priority": 1}).status_code == 404
    assert env.job(queued.job_id).priority == 7
    audit = env.audit("job.priority")
    assert len(audit) == 1 and audit[0].detail == {"from": 0, "to": 7}
    assert audit[0].actor == env.actor("operator")


def test_resend(env: ApiEnv) -> None:
    done = env.seed("done", destination="PACS@h:104")
    with env.client("operator") as c:
        r = c.post(f"/api/jobs/{done.job_id}/resend")
        assert r.status_code == 200, r.text
        assert r.json()["job_id"] == done.job_id
        assert len(r.json()["requeued_deliveries"]) == 1
        assert c.post("/api/jobs/999999/resend").status_code == 404
    with env.client("viewer") as c:
        d = c.get(f"/api/jobs/{done.job_id}").json()
        assert d["deliveries"][0]["state"] == "pending"
    audit = env.audit("job.resend")
    assert audit and audit[-1].actor == env.actor("operator")
    assert audit[-1].target == f"job:{done.job_id}"


def test_withdraw(env: ApiEnv) -> None:
    done = env.seed("done", draft="No acute disease.", destination="PACS@h:104")
    queued = env.seed("queued")
    url = f"/api/jobs/{done.job_id}/withdraw"
    with env.client("viewer") as c:
        assert c.post(url, json={"reason": "wrong study"}).status_code == 403
    with env.client("operator") as c:
        assert c.post(url, json={}).status_code == 422  # a reason is required
        assert c.post(url, json={"reason": ""}).status_code == 422
        r = c.post(url, json={"reason": "wrong study"})
        assert r.status_code == 200, r.text
        body = r.json()
        # the seeded failed delivery is cancelled (no re-queue may send it later); it was
        # attempted, but its SR is not in outputs/: said, not hidden
        assert len(body["cancelled"]) == 1 and body["queued"] == []
        assert "no longer in outputs" in body["skipped"]["PACS@h:104"]
        again = c.post(url, json={"reason": "wrong study"})
        assert again.status_code == 409 and "withdrawn already" in again.json()["detail"]
        r = c.post(f"/api/jobs/{queued.job_id}/withdraw", json={"reason": "x"})
        assert r.status_code == 409 and "no draft" in r.json()["detail"]
        assert c.post("/api/jobs/999999/withdraw", json={"reason": "x"}).status_code == 404
        job = c.get(f"/api/jobs/{done.job_id}").json()["job"]
    assert job["withdrawn_reason"] == "wrong study" and job["withdrawn_at"]
    assert job["withdrawn_by"] == env.actor("operator")
    [audit] = env.audit("job.withdraw")
    assert audit.actor == env.actor("operator") and audit.target == f"job:{done.job_id}"
    assert audit.detail is not None and audit.detail["reached"] == ["PACS@h:104"]


def test_job_shows_the_studys_sr_chain(env: ApiEnv) -> None:
    first = env.seed("done", draft="Clear lungs.")
    with env.sessions() as s:  # a late instance re-drafted the study: a second, newer SR
        old = s.get_one(Job, first.job_id)
        later = Job(
            study_id=old.study_id,
            state=JobState.done,
            created_at=utcnow(),
            updated_at=utcnow(),
            finished_at=utcnow(),
            sr_sop_instance_uid="2.25.42",
        )
        s.add(later)
        s.commit()
        later_id, first_sr = later.id, old.sr_sop_instance_uid
    with env.client("viewer") as c:
        for job_id in (first.job_id, later_id):
            chain = c.get(f"/api/jobs/{job_id}").json()["sr_chain"]
            assert [(v["job_id"], v["sr_uid"], v["superseded"]) for v in chain] == [
                (first.job_id, first_sr, True),
                (later_id, "2.25.42", False),
            ]


def test_review_form_only_where_the_review_is_taken(make_env) -> None:  # type: ignore[no-untyped-def]
    """The job page offers the reviewer the review form only for a draft the review API
    takes: a draft superseded by a later job's draft of the same study is answered 409,
    so its page shows no form (and the current draft's page does)."""
    env = make_env(model=False)
    _row, env.tokens["reviewer"] = create_token(
        env.api_ctx, name="rad-test", role="reviewer", actor="test-setup"
    )
    first = env.seed("done", draft="Clear lungs.")
    with env.sessions() as s:  # a late instance re-drafted the study: a newer job and draft
        later = add_redraft(
            s,
            first.job_id,
            "Right pneumothorax.",
            at=utcnow() + timedelta(seconds=1),
            sr_sop_instance_uid="2.25.43",
        )
        s.commit()
        later_id = later.id
    with env.client("reviewer") as c:
        shown = {j: 'id="review"' in c.get(f"/jobs/{j}").text for j in (first.job_id, later_id)}
        taken = {
            j: c.post(f"/api/jobs/{j}/review", json={"decision": "accept"}).status_code
            for j in (first.job_id, later_id)
        }
    assert taken == {first.job_id: 409, later_id: 200}
    assert shown == {first.job_id: False, later_id: True}


def test_config_summary_has_no_secrets(make_env) -> None:  # type: ignore[no-untyped-def]
    env = make_env(model=False)
    with env.client("admin") as c:
        cfg = c.get("/api/config").json()
    assert cfg["api_host"] == "127.0.0.1"
    assert cfg["database_url"].startswith("sqlite:///")
    assert "token" not in str(cfg).lower() or "cxr_" not in str(cfg)


@pytest.mark.parametrize("path", ["/jobs/{id}", "/jobs/{id}/sr/sr"])
def test_console_job_pages_refuse_an_id_the_database_cannot_hold(
    make_env: EnvFactory, path: str
) -> None:
    """A job id past what the database holds (the API's ``le=ID_MAX``) in the console's job
    and SR pages is refused as bad input (4xx), not a 500 with a traceback in the log, as
    ``GET /api/jobs/{id}`` refuses it."""
    env = make_env(model=False)
    with env.client("viewer") as c:
        for job_id in (2**31, 10**20):
            api = c.get(f"/api/jobs/{job_id}")
            page = c.get(path.format(id=job_id))
            assert api.status_code == 422, api.text
            assert 400 <= page.status_code < 500, (job_id, page.status_code, page.text)


def test_a_nul_character_is_refused_not_a_500(make_env: EnvFactory, db_url: str) -> None:
    """A NUL character in a search or a reason (PostgreSQL's text cannot hold one) is bad
    input: 422 with a reason that names no SQL, nothing changed, never a 500 with a
    traceback; SQLite, which stores it, serves the same searches. A withdrawal's reason,
    which goes out in the rejection note and the HL7 withdrawal, is refused on both."""
    env = make_env(url=db_url, model=False)
    done = env.seed("done", draft="Clear lungs.")
    postgres = db_url.startswith("postgresql")
    with env.client("operator") as c:
        for path, params in (
            ("/api/audit", {"actor": "a\x00b"}),
            ("/api/jobs", {"q": "doe\x00"}),
            ("/api/receive-log", {"calling_ae": "PACS\x00"}),
            ("/", {"q": "doe\x00"}),
            ("/failures", {"destination": "PACS\x00"}),
        ):
            r = c.get(path, params=params)
            assert r.status_code == (422 if postgres else 200), (path, r.status_code, r.text)
            if postgres:
                assert "NUL" in r.json()["detail"] and "SELECT" not in r.text, r.text
        # a withdrawal's reason goes out in the KOS and the HL7 withdrawal: refused on both
        r = c.post(f"/api/jobs/{done.job_id}/withdraw", json={"reason": "wrong\x00study"})
        assert r.status_code == 422 and "NUL" in r.json()["detail"], r.text
    assert env.job(done.job_id).withdrawn_at is None


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_review_with_a_nul_is_refused_clearly(
    make_env,  # type: ignore[no-untyped-def]
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """A NUL in an edited text or a rejection's reason is no report text: 422 naming the
    field, on PostgreSQL (whose text cannot hold it) as on SQLite, not a 500."""
    url = request.getfixturevalue("pg_schema_url") if backend == "postgresql" else None
    env = make_env(url=url, model=False)
    _row, env.tokens["reviewer"] = create_token(
        env.api_ctx, name="rad-test", role="reviewer", actor="test-setup"
    )
    done = env.seed("done", draft="Clear lungs.")
    with env.client("reviewer") as c:
        for body in (
            {"decision": "edit", "text": "Right pneumothorax.\u0000"},
            {"decision": "reject", "reason": "wrong side\u0000"},
        ):
            r = c.post(f"/api/jobs/{done.job_id}/review", json=body)
            assert r.status_code == 422, r.text
        ok = c.post(f"/api/jobs/{done.job_id}/review", json={"decision": "accept"})
        assert ok.status_code == 200
