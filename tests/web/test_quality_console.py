"""The final-report loop in the console, in headless Chromium against a real node (#25).

A radiologist's VERIFIED SR for a drafted study arrives over DICOM (pynetdicom SCU, as the
reporting system) and shows on the job page with its labels and the discrepancy flag; a
seeded history of discordant pairs fills the quality page's plots and raises the alert
banner; the export downloads CSV. Runs after ``test_console.py`` (the banner is global).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from integration.final_report import final_report_from_oru
from node.runtime.finals import FinalIntake
from tests.node.factories import seed_draft, uid
from tests.reporting.final_builders import FINAL_FINDINGS, final_sr, oru
from tests.web.conftest import ConsoleNode, browser_context, check_png, login

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRAFT = "FINDINGS: No pneumothorax. Heart size normal.\nIMPRESSION: No acute disease."
DISCORDANT = (
    "FINDINGS: Large right pneumothorax. Cardiomegaly. Pulmonary edema. Bilateral pleural "
    "effusions. Right lower lobe consolidation.\nIMPRESSION: Right pneumothorax."
)


def _seed_history(node: ConsoleNode, n: int) -> None:
    intake = FinalIntake(node.settings, node.sessions)
    # drafted now: the shared node's hourly retention chore (60 s after its start) purges
    # studies older than retention_days, and with them their drafts and final reports
    now = datetime.now(UTC)
    for k in range(n):
        study = uid()
        seed_draft(node.sessions, study, DRAFT, version="demo-a" if k % 2 else "demo-b", at=now)
        report = final_report_from_oru(oru(control=f"HIST-{k}", zds=False, accession=f"H{k}"))
        intake.receive(replace(report, study_uid=study, text=DISCORDANT), sender="ris")


def test_final_report_on_job_page_quality_page_and_alert(
    console_node: ConsoleNode, done_study: tuple[str, int], browser: Any, tmp_path: Path
) -> None:
    study_uid, job_id = done_study
    # the reporting system sends the signed report for the drafted study over DICOM
    image = next(console_node.settings.spool_dir.rglob(f"{study_uid}/**/*.dcm"))
    sr = final_sr(dcmread(image))
    path = tmp_path / "final.dcm"
    sr.save_as(path, enforce_file_format=True)
    console_node.send(path)
    _seed_history(console_node, console_node.settings.agreement_min_pairs)

    with browser_context(browser) as context:
        page = login(context, console_node, "viewer")
        page.goto(f"{console_node.base_url}/jobs/{job_id}")
        final = page.locator("section.final")
        assert final.count() == 1
        assert console_node.pacs.ae_title in final.inner_text()
        assert FINAL_FINDINGS in final.inner_text()
        assert page.locator("table.labels tbody tr").count() == 14
        assert "Agreement on" in final.inner_text()
        assert page.locator("#quality-banner").is_visible()

        page.goto(f"{console_node.base_url}/quality")
        assert page.locator("#charts svg.chart").count() == 4
        assert page.locator("#charts polyline, #charts circle").count() >= 2
        assert page.locator("#discrepancies tbody tr").count() >= 10
        assert "Quality alert" in page.locator("#quality-banner").inner_text()
        rows = page.locator("#by-version tbody tr").all_inner_texts()
        assert any(r.startswith("demo-a") for r in rows) and any(
            r.startswith("demo-b") for r in rows
        )
        heading = page.locator("#by-observation-heading")
        assert heading.inner_text() == "Per observation (all model versions)"
        page.screenshot(path=str(tmp_path / "quality.png"), full_page=True)
        check_png(tmp_path / "quality.png")
        # filtered by a model version, the observation table says whose it is (it said
        # "all versions shown" whatever the filter)
        page.goto(f"{console_node.base_url}/quality?model_version=demo-a")
        rows = page.locator("#by-version tbody tr").all_inner_texts()
        assert rows and all(r.startswith("demo-a") for r in rows)
        assert heading.inner_text() == "Per observation (model version demo-a)"
        page.goto(f"{console_node.base_url}/quality")
        with page.expect_download() as download:
            page.click("#export-csv")
        csv_text = Path(download.value.path()).read_text()
        assert csv_text.splitlines()[0].startswith("final_id,job_id,study_uid")
        assert len(csv_text.splitlines()) >= 12  # header + the study's pair + the history

    # the API gives the same: the job's final with labels, and the summary
    headers = {"Authorization": f"Bearer {console_node.tokens['viewer']}"}
    detail = httpx.get(f"{console_node.base_url}/api/jobs/{job_id}", headers=headers).json()
    [f] = detail["finals"]
    assert f["source"] == "dicom-sr" and f["sender"] == console_node.pacs.ae_title
    assert set(f["final_labels"]) == set(f["draft_labels"]) and len(f["final_labels"]) == 14
    summary = httpx.get(f"{console_node.base_url}/api/quality/summary", headers=headers).json()
    assert summary["alert"]["active"] is True
    assert summary["overall"]["pairs"] >= console_node.settings.agreement_min_pairs + 1
    metrics = httpx.get(f"{console_node.base_url}/metrics", headers=headers).text
    assert "cxr_agreement_alert 1.0" in metrics


def test_reviewer_accepts_edits_and_rejects_in_the_console(
    console_node: ConsoleNode, done_study: tuple[str, int], browser: Any
) -> None:
    _study_uid, job_id = done_study
    url = f"{console_node.base_url}/jobs/{job_id}"
    with browser_context(browser) as context:
        page = login(context, console_node, "operator")
        page.goto(url)
        assert page.locator("#review").count() == 0  # operators do not review
    with browser_context(browser) as context:
        page = login(context, console_node, "reviewer")
        page.goto(url)
        assert page.locator("#actions").count() == 0  # reviewers do not operate
        page.fill("#review-text", "FINDINGS: Small left pleural effusion.\nIMPRESSION: Effusion.")
        page.click("#review-edit")
        page.wait_for_selector(".review-decision[data-decision='edit']", timeout=15_000)
        page.once("dialog", lambda d: d.accept("laterality wrong"))
        page.click("#review-reject")
        page.wait_for_selector(".review-decision[data-decision='reject']", timeout=15_000)
        text = page.locator("section.final").all_inner_texts()
        assert any("Small left pleural effusion." in t for t in text)
        assert any("laterality wrong" in t for t in text)
    headers = {"Authorization": f"Bearer {console_node.tokens['operator']}"}
    refused = httpx.post(
        f"{console_node.base_url}/api/jobs/{job_id}/review",
        headers=headers,
        json={"decision": "accept"},
    )
    assert refused.status_code == 403
