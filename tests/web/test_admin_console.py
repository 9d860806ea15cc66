"""The console as a PACS admin uses it, in real headless Chromium against a real node:
search the queue by accession and by patient name, page through it, see a failed delivery
as such beside the job state and re-send it, read a job's history, and look at the SR it
sent (rendered, and downloaded as DICOM).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.db.models import AuditLog, Delivery, DeliveryState
from tests.helpers import wait_for
from tests.web.conftest import (
    ConsoleNode,
    browser_context,
    chest_file,
    login,
    wait_job_state,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _failed_delivery(node: ConsoleNode, job_id: int) -> Delivery | None:
    with node.sessions() as session:
        return session.scalars(
            select(Delivery).where(
                Delivery.job_id == job_id,
                Delivery.destination == node.dead_destination,
                Delivery.state == DeliveryState.failed,
            )
        ).first()


def test_search_page_failures_history_and_sr(
    console_node: ConsoleNode, browser: Any, tmp_path: Path
) -> None:
    node = console_node
    path, uid = chest_file(
        tmp_path,
        PatientName="SEARCHLIGHT^ALICE",
        PatientID="MRN-WEB-1",
        AccessionNumber="ACCWEB77",
        StudyDate="20261203",
    )
    node.send(path)
    (tmp_path / "other").mkdir()
    other, _other_uid = chest_file(tmp_path / "other", PatientName="OTHER^PATIENT")
    node.send(other)
    job = wait_job_state(node, uid, {"done", "failed"}, timeout=300)
    assert job.state.value == "done", job.last_error
    job_id = int(job.id)
    # the dead destination never answers: after its attempts the delivery fails for good
    wait_for(lambda: _failed_delivery(node, job_id) is not None, timeout=120, interval=0.5)

    with browser_context(browser) as ctx:
        page = login(ctx, node, "operator")
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        # search by accession: only that study, with its identity and both states
        page.fill("#search-q", "accweb7")
        page.click("#search-submit")
        page.wait_for_url(lambda url: "q=accweb7" in url)
        rows = page.locator("#jobs-body tr")
        rows.first.wait_for()
        assert rows.count() == 1
        row = rows.first
        text = row.inner_text()
        assert "SEARCHLIGHT, ALICE" in text and "MRN-WEB-1" in text and "ACCWEB77" in text
        assert "2026-12-03" in text and uid in text
        assert row.locator(".badge.state-done").inner_text() == "done"
        assert row.locator(".badge.delivery-failed").inner_text() == "delivery failed"
        # the 2 s refresh keeps the search
        page.wait_for_timeout(2500)
        assert page.locator("#jobs-body tr").count() == 1

        # search by patient name, words in any case and order
        page.fill("#search-q", "alice searchlight")
        page.click("#search-submit")
        page.wait_for_url(lambda url: "q=alice+searchlight" in url)
        page.locator("#jobs-body tr", has_text=uid).wait_for()
        assert page.locator("#jobs-body tr").count() == 1
        page.fill("#search-q", "nobody-has-this-name")
        page.click("#search-submit")
        page.locator("#jobs-empty").wait_for(state="visible")

        # server-side paging: one row a page, the next page shows another job
        page.goto(node.base_url + "/?per=1")
        first = page.locator("#jobs-body tr").first.get_attribute("data-job-id")
        assert "page 1 of" in page.inner_text("#page-info")
        page.click("#page-next")
        page.wait_for_url(lambda url: "page=2" in url)
        second = page.locator("#jobs-body tr").first.get_attribute("data-job-id")
        assert first and second and first != second
        assert page.locator("#jobs-body tr").count() == 1

        # the failures view lists the failed delivery, with its error; re-send it
        page.click("#nav-failures")
        page.wait_for_url("**/failures")
        failed = _failed_delivery(node, job_id)
        assert failed is not None
        frow = page.locator(f'#failures tr[data-delivery-id="{failed.id}"]')
        assert "ACCWEB77" in frow.inner_text() and node.dead_destination in frow.inner_text()
        assert frow.locator(".error").inner_text().strip()
        frow.locator("button.resend-delivery").click()
        page.locator("#resend-result", has_text="queued again").wait_for()
        with node.sessions() as session:
            audit = session.scalars(
                select(AuditLog).where(
                    AuditLog.action == "delivery.resend", AuditLog.target == f"job:{job_id}"
                )
            ).all()
            assert len(audit) == 1 and str(failed.id) in audit[0].detail["deliveries"]

        # the job page: identity, history, the SR rendered and downloadable
        page.goto(f"{node.base_url}/jobs/{job_id}")
        assert "SEARCHLIGHT, ALICE" in page.inner_text("#patient")
        history = page.locator("#history tbody tr")
        kinds = [history.nth(i).get_attribute("data-kind") for i in range(history.count())]
        for kind in ("received", "queued", "claimed", "stage", "drafted", "done", "delivery"):
            assert kind in kinds, kinds
        assert "delivery.resend" in kinds
        assert kinds.index("received") < kinds.index("claimed") < kinds.index("done")
        assert page.locator("#receive-log-link").get_attribute("href").endswith(uid)
        sr_row = page.locator('#objects tr[data-key="sr"]')
        sr_row.locator("a.render").click()
        page.wait_for_url(f"**/jobs/{job_id}/sr/sr")
        assert "UNVERIFIED" in page.inner_text("#sr-flags")
        assert page.inner_text("#sr-sop-uid").strip() == job.sr_sop_instance_uid
        tree = page.inner_text("#sr-tree")
        assert "Impression" in tree and "CONTAINER" in tree
        resp = page.request.get(node.base_url + f"/api/jobs/{job_id}/objects/sr")
        assert resp.status == 200 and resp.headers["content-type"] == "application/dicom"
        sr = dcmread(BytesIO(resp.body()))
        assert str(sr.SOPInstanceUID) == job.sr_sop_instance_uid
        assert sr.StudyInstanceUID == uid
        assert not errors, errors
