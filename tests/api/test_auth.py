"""Authentication, roles, tokens and the web session's CSRF protection, on a running API."""

from __future__ import annotations

import pytest

from node.api.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE
from node.db import tokens as tokens_db
from node.db.models import ApiToken
from node.services.tokens import hash_secret
from tests.api.conftest import ApiEnv

pytestmark = pytest.mark.integration


def test_health_needs_no_token_and_everything_else_does(env: ApiEnv) -> None:
    with env.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        for path in ("/api/jobs", "/ready", "/metrics", "/api/audit", "/api/config"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "detail" in r.json()
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code in (401, 404)  # no CDN-backed pages


def test_bad_scheme_unknown_and_revoked_tokens_get_401(env: ApiEnv) -> None:
    with env.client() as c:
        r = c.get("/api/jobs", headers={"Authorization": f"Basic {env.tokens['admin']}"})
        assert r.status_code == 401
        r = c.get("/api/jobs", headers={"Authorization": "Bearer cxr_not-a-token"})
        assert r.status_code == 401
    with env.client("viewer") as c:
        assert c.get("/api/jobs").status_code == 200
    with env.client("admin") as c:
        r = c.delete(f"/api/tokens/{env.token_ids['viewer']}")
        assert r.status_code == 200 and r.json()["revoked_at"] is not None
    with env.client("viewer") as c:
        r = c.get("/api/jobs")
        assert r.status_code == 401
        assert "revoked" in r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body", "least"),
    [
        ("POST", "/api/jobs/{job}/retry", None, "operator"),
        ("POST", "/api/jobs/{job}/cancel", {}, "operator"),
        ("POST", "/api/jobs/{job}/priority", {"priority": 5}, "operator"),
        ("POST", "/api/jobs/{job}/resend", None, "operator"),
        ("POST", "/api/generate-image", {"report": "No acute disease."}, "operator"),
        ("POST", "/api/studies/{study}/vqa", {"question": "Is there effusion?"}, "operator"),
        ("GET", "/api/tokens", None, "admin"),
        ("POST", "/api/tokens", {"name": "x", "role": "viewer"}, "admin"),
        ("DELETE", "/api/tokens/{token}", None, "admin"),
        ("GET", "/api/config", None, "admin"),
    ],
)
def test_role_boundaries(
    env: ApiEnv, method: str, path: str, body: dict[str, object] | None, least: str
) -> None:
    seeded = env.seed("failed")
    url = path.format(job=seeded.job_id, study=seeded.study_uid, token=env.token_ids["viewer"])
    weaker = {"operator": ["viewer"], "admin": ["viewer", "operator"]}[least]
    for role in weaker:
        with env.client(role) as c:
            r = c.request(method, url, json=body)
            assert r.status_code == 403, (role, r.text)
            assert f"role {least} required" in r.json()["detail"]
    # the refused calls changed nothing
    assert env.job(seeded.job_id).state.value == "failed"
    assert env.job(seeded.job_id).priority == 0
    with env.client(least) as c:
        r = c.request(method, url, json=body)
        assert r.status_code < 400 or r.status_code in (409, 422), r.text


def test_viewer_reads(env: ApiEnv) -> None:
    seeded = env.seed("failed")
    with env.client("viewer") as c:
        assert c.get("/api/jobs").json()["total"] == 1
        assert c.get(f"/api/jobs/{seeded.job_id}").status_code == 200
        assert c.get("/api/audit").status_code == 200
        assert c.get("/api/status").json()["jobs"]["failed"] == 1
        assert c.get("/api/session").json()["role"] == "viewer"


def test_tokens_are_stored_hashed_and_managed_by_admin(env: ApiEnv) -> None:
    with env.client("admin") as c:
        r = c.post("/api/tokens", json={"name": "ci-bot", "role": "operator"})
        assert r.status_code == 201
        created = r.json()
        secret = created["token"]
        assert secret.startswith("cxr_") and len(secret) >= 40
        listed = c.get("/api/tokens").json()
        assert {t["name"] for t in listed} >= {"ci-bot", "admin-test"}
        assert all("token" not in t and "token_hash" not in t for t in listed)
        assert c.post("/api/tokens", json={"name": "bad", "role": "root"}).status_code == 422
        assert c.delete("/api/tokens/999999").status_code == 404
    with env.sessions() as s:
        row = s.get(ApiToken, created["id"])
        assert row is not None
        assert row.token_hash == hash_secret(secret) and secret not in row.token_hash
    with httpx_client(env, secret) as c:
        assert c.get("/api/session").json()["role"] == "operator"
    with env.sessions() as s:
        assert tokens_db.list_tokens(s)[-1].last_used_at is not None
    with env.client("admin") as c:
        assert c.delete(f"/api/tokens/{created['id']}").status_code == 200
    with httpx_client(env, secret) as c:
        assert c.get("/api/session").status_code == 401
    create = [a for a in env.audit("token.create") if a.target == f"token:{created['id']}"]
    assert create[0].actor == env.actor("admin")
    assert create[0].detail == {"name": "ci-bot", "role": "operator"}
    revoke = env.audit("token.revoke")
    assert revoke[-1].target == f"token:{created['id']}" and revoke[-1].actor == env.actor("admin")


def test_a_token_name_is_refused_not_cut_short(env: ApiEnv) -> None:
    """A name of spaces only passes the API's pattern but is refused (422), as the repository
    refuses one over 128 characters instead of storing its first 128 (as it did)."""
    with env.client("admin") as c:
        before = c.get("/api/tokens").json()
        for name in ("   ", "a" * 129):
            r = c.post("/api/tokens", json={"name": name, "role": "viewer"})
            assert r.status_code == 422, (name, r.text)
        assert c.get("/api/tokens").json() == before
    with env.sessions() as s:
        with pytest.raises(ValueError, match="1 to 128"):
            tokens_db.create_token(
                s, name="a" * 129, role="viewer", token_hash="0" * 64, actor="test"
            )
        assert tokens_db.check_name("  ops 1  ") == "ops 1"
    assert [a for a in env.audit("token.create") if a.actor == "test"] == []


def httpx_client(env: ApiEnv, token: str):  # type: ignore[no-untyped-def]
    import httpx

    return httpx.Client(base_url=env.base, headers={"Authorization": f"Bearer {token}"})


def test_cookie_session_and_csrf(env: ApiEnv) -> None:
    seeded = env.seed("failed")
    other = env.seed("failed")
    with env.client() as c:
        assert c.post("/api/session", json={"token": "cxr_wrong"}).status_code == 401
        r = c.post("/api/session", json={"token": env.tokens["operator"]})
        assert r.status_code == 200
        csrf = r.json()["csrf_token"]
        set_cookie = "\n".join(r.headers.get_list("set-cookie"))
        session_line = next(x for x in r.headers.get_list("set-cookie") if SESSION_COOKIE in x)
        assert "httponly" in session_line.lower()
        assert "samesite=strict" in session_line.lower()
        assert f"{CSRF_COOKIE}={csrf}" in set_cookie
        # reads with the cookie alone
        assert c.get("/api/jobs").status_code == 200
        assert c.get("/api/session").json()["via"] == "cookie"
        # unsafe without the header: refused, nothing changed
        r = c.post(f"/api/jobs/{seeded.job_id}/retry")
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
        r = c.post(f"/api/jobs/{seeded.job_id}/retry", headers={CSRF_HEADER: "forged"})
        assert r.status_code == 403
        assert env.job(seeded.job_id).state.value == "failed"
        # with it: done, audited as the session's token
        r = c.post(f"/api/jobs/{seeded.job_id}/retry", headers={CSRF_HEADER: csrf})
        assert r.status_code == 200 and r.json()["state"] == "queued"
        assert env.audit("job.requeue")[-1].actor == env.actor("operator")
        # logout ends the session
        assert c.delete("/api/session", headers={CSRF_HEADER: csrf}).status_code == 204
        c.cookies.clear()
    with env.client() as c:
        c.cookies.set(SESSION_COOKIE, "x" * 43)
        assert c.get("/api/jobs").status_code == 401
    # a revoked token's sessions die with it
    with env.client() as c:
        csrf = c.post("/api/session", json={"token": env.tokens["operator"]}).json()["csrf_token"]
        with env.client("admin") as admin:
            assert admin.delete(f"/api/tokens/{env.token_ids['operator']}").status_code == 200
        r = c.post(f"/api/jobs/{other.job_id}/retry", headers={CSRF_HEADER: csrf})
        assert r.status_code == 401
    assert env.job(other.job_id).state.value == "failed"


def test_bearer_requests_need_no_csrf_header(env: ApiEnv) -> None:
    seeded = env.seed("failed")
    with env.client("operator") as c:
        # a stale session cookie does not matter when a bearer token is sent
        c.cookies.set(SESSION_COOKIE, "stale")
        r = c.post(f"/api/jobs/{seeded.job_id}/retry")
        assert r.status_code == 200 and r.json()["state"] == "queued"


def test_api_binds_to_loopback_by_default(env: ApiEnv) -> None:
    assert env.settings.api_host == "127.0.0.1"
    assert env.server.host == "127.0.0.1"
