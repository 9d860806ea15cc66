"""The web console driven in real headless Chromium against a real node.

A real node (storage SCP, SQLite, demo model, worker, delivery, API + console) runs in a
thread; studies arrive over DICOM C-STORE from a pynetdicom SCU; the browser logs in with
API tokens through the login page and uses the pages as an operator or a viewer would.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.db.models import ApiRole, AuditLog, Delivery, DeliveryObject, DeliveryState, JobState
from tests.helpers import wait_for
from tests.web.conftest import (
    ConsoleNode,
    browser_context,
    check_png,
    chest_file,
    job_of_study,
    login,
    wait_job_state,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRAFT_LABEL = "AI draft — preliminary, not verified"


def _audit(node: ConsoleNode, action: str, target: str) -> list[AuditLog]:
    with node.sessions() as session:
        return list(
            session.scalars(
                select(AuditLog)
                .where(AuditLog.action == action, AuditLog.target == target)
                .order_by(AuditLog.id)
            )
        )


def _audit_count(node: ConsoleNode, target: str) -> int:
    with node.sessions() as session:
        return len(list(session.scalars(select(AuditLog.id).where(AuditLog.target == target))))


def _fetch(page: Any, method: str, url: str, *, csrf: bool) -> int:
    """Run ``fetch`` inside the page (the browser's cookies); return the HTTP status."""
    return int(
        page.evaluate(
            """async ([method, url, csrf]) => {
                const headers = {"Content-Type": "application/json"};
                if (csrf) headers["X-CSRF-Token"] = window.cxrConsole.csrfToken();
                const r = await fetch(url, {method, headers, body: "{}",
                                            credentials: "same-origin"});
                return r.status;
            }""",
            [method, url, csrf],
        )
    )


def test_pages_need_a_session_and_carry_csp(console_node: ConsoleNode) -> None:
    base = console_node.base_url
    with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as client:
        for path in ("/", "/jobs/1", "/destinations", "/try"):
            r = client.get(path)
            assert r.status_code == 303, path
            assert r.headers["location"].startswith("/login?next=")
        login_page = client.get("/login")
        assert login_page.status_code == 200
        csp = login_page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert 'id="token"' in login_page.text
        # the hint names every role a token may have
        hint = re.search(r"--role ([a-z|]+)", login_page.text)
        assert hint and set(hint.group(1).split("|")) == {role.value for role in ApiRole}
        # the demo warning is on every page, the login page included (no model details there)
        assert 'id="demo-banner"' in login_page.text and "DEMO MODEL" in login_page.text
        assert "demo-h64" not in login_page.text
        js = client.get("/static/console.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert client.get("/static/..%2Fauth.py").status_code == 404
        assert client.get("/ui/summary").status_code == 401
        # a bearer token works for the pages too (scripts, curl)
        bearer = {"Authorization": f"Bearer {console_node.tokens['viewer']}"}
        r = client.get("/", headers=bearer)
        assert r.status_code == 200 and 'id="jobs-table"' in r.text
        assert r.headers["cache-control"] == "no-store"
        missing = client.get("/jobs/999999", headers=bearer)
        assert missing.status_code == 404 and "job 999999 does not exist" in missing.text
        summary = client.get("/ui/summary", headers=bearer).json()
        assert summary["model"]["state"] == "ready" and summary["model"]["demo"] is True
        assert set(summary["counts"]) == {s.value for s in JobState}


def test_login_queue_job_and_retry(
    console_node: ConsoleNode, browser: Any, tmp_path: Path, done_study: tuple[str, int]
) -> None:
    """Operator: log in, watch a C-STOREd study appear live, open it, retry a failed job."""
    node = console_node
    with browser_context(browser) as ctx:
        page = login(ctx, node, "operator")
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        assert page.locator("#demo-banner").is_visible()
        assert "DEMO MODEL" in page.inner_text("#demo-banner")
        assert page.inner_text("#model-state") == "ready"

        # a lateral-only study: the worker cannot pick a frontal image, the job fails
        path, lateral_uid = chest_file(tmp_path, view="LL")
        node.send(path)
        row = page.locator("#jobs-body tr", has_text=lateral_uid)
        # the page is not reloaded: the row arrives through the 2 s refresh
        row.wait_for(timeout=60_000)
        job = wait_job_state(node, lateral_uid, {"failed", "done"}, timeout=300)
        assert job.state.value == "failed"
        page.locator("#jobs-body tr", has_text=lateral_uid).locator(
            ".badge", has_text="failed"
        ).wait_for(timeout=30_000)
        assert int(page.inner_text('.count[data-state="failed"] b')) >= 1

        # the drafted study is on the queue too, done, with its SR UID
        done_uid, done_id = done_study
        done_row = page.locator("#jobs-body tr", has_text=done_uid)
        assert "done" in done_row.inner_text()
        done_job = job_of_study(node, done_uid)
        assert (
            done_job.sr_sop_instance_uid and done_job.sr_sop_instance_uid in done_row.inner_text()
        )

        # the state filter keeps only failed jobs
        page.select_option("#state-filter", "failed")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#jobs-body tr')]"
            ".every(r => r.dataset.state === 'failed')"
            " && document.querySelectorAll('#jobs-body tr').length > 0",
            timeout=15_000,
        )
        assert page.locator("#jobs-body tr", has_text=done_uid).count() == 0
        page.select_option("#state-filter", "")
        page.locator("#jobs-body tr", has_text=done_uid).wait_for(timeout=15_000)
        queue_png = tmp_path / "queue.png"
        page.screenshot(path=str(queue_png), full_page=True)
        check_png(queue_png)

        # open the done job: labelled AI draft, SR UID, deliveries, stages
        page.locator("#jobs-body tr", has_text=done_uid).locator("a").click()
        page.wait_for_url(f"{node.base_url}/jobs/{done_id}")
        assert page.inner_text("#draft-label").strip() == DRAFT_LABEL
        assert page.inner_text("#sr-uid").strip() == done_job.sr_sop_instance_uid
        assert page.inner_text("#study-uid").strip() == done_uid
        assert node.pacs.ae_title in page.inner_text("#deliveries")
        assert "Last attempt" in page.inner_text("#deliveries thead")
        assert "finished" in page.inner_text("#stages")
        assert page.locator("#demo-banner").is_visible()
        assert page.locator("#resend").is_enabled()
        job_png = tmp_path / "job-done.png"
        page.screenshot(path=str(job_png), full_page=True)
        check_png(job_png)

        # open the failed job and retry it
        page.goto(f"{node.base_url}/jobs/{job.id}")
        assert "failed" in page.inner_text("#job-state")
        assert page.locator("#last-error").is_visible()
        assert page.locator("#retry").is_enabled()
        assert not page.locator("#cancel").is_enabled()
        before = len(_audit(node, "job.requeue", f"job:{job.id}"))
        page.click("#retry")
        # the script posts to the API, then reloads the page (the result text is short-lived)
        wait_for(lambda: len(_audit(node, "job.requeue", f"job:{job.id}")) > before, timeout=30)
        requeues = _audit(node, "job.requeue", f"job:{job.id}")
        assert len(requeues) == before + 1
        assert requeues[-1].actor == node.actor("operator")
        assert requeues[-1].detail == {"from": "failed", "to": "queued", "reason": None}
        # the page reloads itself; the audit trail shows the retry
        page.locator("#audit", has_text="job.requeue").wait_for(timeout=15_000)
        retry_png = tmp_path / "job-retried.png"
        page.screenshot(path=str(retry_png), full_page=True)
        check_png(retry_png)
        print(f"screenshots: {queue_png} {job_png} {retry_png}")
        # the pages run under the CSP (no inline script or style is blocked) without errors
        assert not [e for e in console_errors if "Content Security Policy" in e], console_errors


def test_viewer_sees_no_actions_and_csrf_is_enforced(
    console_node: ConsoleNode, browser: Any, done_study: tuple[str, int]
) -> None:
    node = console_node
    _uid, job_id = done_study
    target = f"job:{job_id}"
    before = _audit_count(node, target)
    with browser_context(browser) as ctx:
        page = login(ctx, node, "viewer")
        page.goto(f"{node.base_url}/jobs/{job_id}")
        assert page.inner_text("#draft-label").strip() == DRAFT_LABEL
        assert page.locator("#retry").count() == 0
        assert page.locator("#cancel").count() == 0
        assert page.locator("#resend").count() == 0
        assert page.locator("#viewer-note").is_visible()
        # the server refuses the viewer even with a valid CSRF header
        assert _fetch(page, "POST", f"/api/jobs/{job_id}/resend", csrf=True) == 403
    with browser_context(browser) as ctx:
        page = login(ctx, node, "operator")
        page.goto(f"{node.base_url}/jobs/{job_id}")
        # a forged request (no CSRF header) riding on the operator's cookie is refused
        assert _fetch(page, "POST", f"/api/jobs/{job_id}/cancel", csrf=False) == 403
        assert _fetch(page, "POST", "/api/destinations/0/echo", csrf=False) == 403
    assert _audit_count(node, target) == before
    assert job_of_study(node, _uid).state.value == "done"


def test_destinations_health_and_echo(
    console_node: ConsoleNode, browser: Any, tmp_path: Path, done_study: tuple[str, int]
) -> None:
    node = console_node
    _uid, job_id = done_study

    def dead_given_up() -> bool:
        with node.sessions() as session:
            state = session.scalar(
                select(Delivery.state).where(
                    Delivery.job_id == job_id, Delivery.destination == node.dead_destination
                )
            )
        return state is DeliveryState.failed

    wait_for(dead_given_up, timeout=120, interval=0.2)
    with browser_context(browser) as ctx:
        page = login(ctx, node, "operator")
        page.click("text=Destinations")
        page.wait_for_url(f"{node.base_url}/destinations")
        good = page.locator('#destinations tr[data-index="0"]')
        dead = page.locator('#destinations tr[data-index="1"]')
        assert node.pacs.ae_title in good.inner_text()
        assert node.dead_destination in dead.inner_text()
        # the drafted study's SR reached the stand-in PACS: a last-success time is shown
        year = str(datetime.now(UTC).year)
        assert year in good.locator("td").nth(3).inner_text()
        # the unreachable one: deliveries given up (2 attempts), with the connection error
        assert "gave up" in dead.locator(".failure").inner_text()
        assert "cannot connect" in dead.locator("td.error").inner_text()
        for row, expected in ((good, "success"), (dead, "failed")):
            row.locator("button.echo").click()
            page.wait_for_function(
                "(el) => !el.textContent.startsWith('C-ECHO')",
                arg=row.locator(".echo-result").element_handle(),
                timeout=30_000,
            )
            assert row.locator(".echo-result").inner_text().startswith(expected)
        png = tmp_path / "destinations.png"
        page.screenshot(path=str(png), full_page=True)
        check_png(png, min_height=300)
    echoes = _audit(node, "destination.echo", "destination:0")
    assert echoes and echoes[-1].detail is not None and echoes[-1].detail["ok"] is True
    assert _audit(node, "destination.echo", "destination:1")[-1].detail["ok"] is False  # type: ignore[index]


def test_report_text_is_escaped(
    console_node: ConsoleNode, browser: Any, done_study: tuple[str, int]
) -> None:
    """Draft text with markup is shown as text: no element is injected into the page."""
    from node.db.models import Draft, utcnow

    node = console_node
    _uid, job_id = done_study
    hostile = '<img id="injected" src="/x" onerror="document.title=\'pwned\'">no effusion'
    with node.sessions() as session:
        session.add(
            Draft(
                job_id=job_id,
                task="report",
                findings="<script id='injected2'>document.title='pwned'</script>",
                impression=hostile,
                full_text=hostile,
                model_name="escape-test",
                model_version="0",
                demo=True,
                created_at=utcnow(),
            )
        )
        session.commit()
    with browser_context(browser) as ctx:
        page = login(ctx, node, "viewer")
        page.goto(f"{node.base_url}/jobs/{job_id}")
        assert page.inner_text("#draft-impression") == hostile
        assert page.locator("#injected").count() == 0
        assert page.locator("#injected2").count() == 0
        assert page.title() != "pwned"


def test_try_page_vqa_and_report_to_image(
    console_node: ConsoleNode,
    browser: Any,
    tmp_path: Path,
    done_study: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    node = console_node
    uid, _job_id = done_study
    with browser_context(browser) as ctx:
        page = login(ctx, node, "operator")
        page.goto(f"{node.base_url}/try")
        assert page.locator("#demo-banner").is_visible()
        page.select_option("#vqa-study", uid)
        page.fill("#vqa-question", "Is there a pleural effusion?")
        page.click("#vqa-form button[type=submit]")
        page.wait_for_function(
            "() => { const t = document.getElementById('vqa-answer').textContent;"
            " return t && t !== 'asking…'; }",
            timeout=120_000,
        )
        answer = page.inner_text("#vqa-answer")
        assert answer and not page.locator("#vqa-answer.error").count(), answer
        # model output never reaches the node's logs
        assert answer.strip() not in caplog.text
        page.fill("#gen-text", "No acute cardiopulmonary process.")
        page.click("#gen-form button[type=submit]")
        page.wait_for_function(
            "() => { const i = document.getElementById('gen-image');"
            " return i.complete && i.naturalWidth > 0; }",
            timeout=180_000,
        )
        size = page.evaluate(
            "() => { const i = document.getElementById('gen-image');"
            " return [i.naturalWidth, i.naturalHeight]; }"
        )
        assert size == [256, 256]
        assert "SYNTHETIC" in page.inner_text("#gen-figure figcaption")
        png = tmp_path / "try.png"
        page.screenshot(path=str(png), full_page=True)
        check_png(png)
    with browser_context(browser) as ctx:
        page = login(ctx, node, "viewer")
        page.goto(f"{node.base_url}/try")
        assert page.locator("#viewer-note").is_visible()
        assert not page.locator("#gen-form button[type=submit]").is_enabled()
        assert not page.locator("#vqa-form button[type=submit]").is_enabled()
        png = tmp_path / "try-viewer.png"
        page.screenshot(path=str(png), full_page=True)
        check_png(png)


def test_logout_ends_the_session(console_node: ConsoleNode, browser: Any) -> None:
    node = console_node
    with browser_context(browser) as ctx:
        page = login(ctx, node, "viewer")
        page.click("#logout")
        page.wait_for_url(f"{node.base_url}/login", timeout=15_000)
        page.goto(f"{node.base_url}/")
        assert "/login" in page.url


def test_login_goes_back_only_to_a_page_of_the_node(
    console_node: ConsoleNode, browser: Any
) -> None:
    """After the login the page goes to ``next`` only when the browser reads it as a page of
    the node: ``/\\host`` and ``/<tab>/host`` are ``//host`` to a browser (WHATWG URL: a
    backslash is a slash, tabs and newlines are dropped), another origin, so the login lands
    on the queue instead; a path of the node, with its query, is kept."""
    node = console_node
    elsewhere = f"localhost:{node.settings.api_port}/destinations"  # another origin
    for target in (f"/\\{elsewhere}", f"/\t/{elsewhere}", f"//{elsewhere}", "/destinations?x=1"):
        with browser_context(browser) as ctx:
            page = ctx.new_page()
            page.goto(f"{node.base_url}/login?next={quote(target, safe='')}")
            login_url = page.url
            page.fill("#token", node.tokens["viewer"])
            page.click("#login-submit")
            page.wait_for_url(lambda url, was=login_url: url != was, timeout=15_000)
            page.wait_for_load_state()
            expected = "/destinations?x=1" if target.startswith("/destinations") else "/"
            assert page.url == node.base_url + expected, (target, page.url)


def test_operator_withdraws_a_sent_draft(
    console_node: ConsoleNode, browser: Any, tmp_path: Path
) -> None:
    node = console_node
    path, uid = chest_file(tmp_path)
    node.send(path)
    first = wait_job_state(node, uid, {"done", "failed"}, timeout=300)
    assert first.state is JobState.done, first.last_error
    # a late lateral image of the study: a second draft supersedes the first
    late = dcmread(path)
    late.SeriesInstanceUID, late.SOPInstanceUID = generate_uid(), generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.ViewPosition = "LL"
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path, enforce_file_format=True)
    node.send(late_path)
    wait_for(lambda: job_of_study(node, uid).id != first.id, timeout=60)
    job = wait_job_state(node, uid, {"done", "failed"}, timeout=300)
    assert job.state is JobState.done, job.last_error

    def sent_to_pacs() -> bool:
        with node.sessions() as s:
            rows = s.scalars(select(Delivery).where(Delivery.job_id == job.id))
            return any(r.state is DeliveryState.sent for r in rows)

    wait_for(sent_to_pacs, timeout=60)
    with browser_context(browser) as context:
        page = login(context, node, "operator")
        page.goto(f"{node.base_url}/jobs/{job.id}")
        assert page.locator("#withdraw").is_enabled()
        assert page.locator("#withdrawn").count() == 0
        chain = page.locator("#sr-chain tbody tr")
        assert chain.count() == 2
        assert "superseded" in chain.nth(0).inner_text()
        assert first.sr_sop_instance_uid in chain.nth(0).inner_text()
        assert "current" in chain.nth(1).inner_text()
        # the button asks for the reason in a prompt; an empty answer does nothing
        page.once("dialog", lambda d: d.accept(""))
        page.click("#withdraw")
        assert _audit(node, "job.withdraw", f"job:{job.id}") == []
        page.once("dialog", lambda d: d.accept("sent for the wrong patient"))
        page.click("#withdraw")
        wait_for(lambda: bool(_audit(node, "job.withdraw", f"job:{job.id}")), timeout=30)
        [entry] = _audit(node, "job.withdraw", f"job:{job.id}")
        assert entry.actor == node.actor("operator")
        assert entry.detail is not None and entry.detail["reason"] == "sent for the wrong patient"
        # the page reloads: the job says it, the button is off, the withdrawal is queued
        page.locator("#withdrawn", has_text="sent for the wrong patient").wait_for(timeout=15_000)
        assert not page.locator("#withdraw").is_enabled()
        assert "withdrawal" in page.inner_text("#deliveries")

    def kos_sent() -> bool:
        with node.sessions() as s:
            rows = s.scalars(
                select(Delivery).where(
                    Delivery.job_id == job.id,
                    Delivery.destination == f"{node.pacs.ae_title}@127.0.0.1:{node.pacs.port}",
                    Delivery.object == DeliveryObject.withdrawal,
                )
            )
            return any(r.state is DeliveryState.sent for r in rows)

    wait_for(kos_sent, timeout=60)
