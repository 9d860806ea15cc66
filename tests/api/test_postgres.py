"""One run of the admin flow against PostgreSQL (fresh schema), through the running API."""

from __future__ import annotations

import pytest

from node.api.auth import CSRF_HEADER
from tests.api.conftest import EnvFactory

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_admin_flow_on_postgresql(make_env: EnvFactory, pg_schema_url: str) -> None:
    env = make_env(url=pg_schema_url, model=False)
    assert env.settings.database_backend == "postgresql"
    failed = env.seed("failed")
    queued = env.seed("queued")
    done = env.seed("done", draft="Clear lungs.", destination="PACS@h:104")
    with env.client("viewer") as c:
        assert c.get("/api/jobs").json()["total"] == 3
        assert c.get("/api/jobs", params={"state": "failed"}).json()["items"][0]["id"] == (
            failed.job_id
        )
        assert c.get(f"/api/jobs/{done.job_id}").json()["draft"]["text"] == "Clear lungs."
        assert c.post(f"/api/jobs/{failed.job_id}/retry").status_code == 403
    with env.client() as c:
        assert c.get("/api/jobs").status_code == 401
    with env.client("operator") as c:
        assert c.post(f"/api/jobs/{failed.job_id}/retry").json()["state"] == "queued"
        assert c.post(f"/api/jobs/{queued.job_id}/cancel").json()["state"] == "cancelled"
        assert c.post(f"/api/jobs/{done.job_id}/cancel").status_code == 409
        r = c.post(f"/api/jobs/{failed.job_id}/priority", json={"priority": 3})
        assert r.json()["priority"] == 3
    with env.client("admin") as c:
        new = c.post("/api/tokens", json={"name": "pg", "role": "viewer"}).json()
        assert c.delete(f"/api/tokens/{new['id']}").status_code == 200
    with env.client() as c:
        csrf = c.post("/api/session", json={"token": env.tokens["operator"]}).json()["csrf_token"]
        assert c.post(f"/api/jobs/{queued.job_id}/retry").status_code == 403
        r = c.post(f"/api/jobs/{queued.job_id}/retry", headers={CSRF_HEADER: csrf})
        assert r.status_code == 200 and r.json()["state"] == "queued"
    actions = {
        a: [x.actor for x in env.audit(a)]
        for a in ("job.requeue", "job.cancel", "job.priority", "token.create", "token.revoke")
    }
    assert actions["job.requeue"] == [env.actor("operator")] * 2
    assert actions["job.cancel"] == [env.actor("operator")]
    assert actions["job.priority"] == [env.actor("operator")]
    assert env.actor("admin") in actions["token.create"]
    assert actions["token.revoke"] == [env.actor("admin")]
    with env.client("viewer") as c:
        text = c.get("/metrics").text
    assert 'cxr_jobs{state="queued"} 2.0' in text and 'cxr_jobs{state="done"} 1.0' in text


def test_a_password_in_the_urls_query_is_masked_too(
    make_env: EnvFactory, pg_schema_url: str
) -> None:
    """libpq takes the password as a URL query parameter too (``?password=``, and
    ``sslpassword`` for the client key): masked like one in the user part wherever the URL
    is shown (``GET /api/config``, ``GET /api/system``, the logged configuration)."""
    url = f"{pg_schema_url}&password=hunter2-query&sslpassword=hunter3-key"
    env = make_env(url=url, model=False)
    with env.client("admin") as c:
        config = c.get("/api/config")
        system = c.get("/api/system")
    assert config.status_code == system.status_code == 200
    for shown in (config.text, system.text, env.settings.public_database_url):
        assert "hunter2-query" not in shown and "hunter3-key" not in shown, shown
    masked = config.json()["database_url"]
    assert "password=***" in masked and "sslpassword=***" in masked, masked
    assert "search_path" in masked  # the other parameters stay
