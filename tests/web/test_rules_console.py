"""The Rules page in headless Chromium against a real node: the rule set is shown, a dry-run
of a stored study says which rule matched and why, and an uploaded header that no rule
matches is explained without quoting its free text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.web.conftest import ConsoleNode, browser_context, chest_file, login

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_rules_page_dry_run(console_node: ConsoleNode, browser: Any, tmp_path: Path) -> None:
    path, study_uid = chest_file(tmp_path)
    console_node.send(path)  # stored once the C-STORE succeeded
    hand = dcmread(path)
    hand.BodyPartExamined = "HAND"
    hand.StudyDescription = "XR HAND LEFT"
    hand_path = tmp_path / "hand.dcm"
    hand.save_as(hand_path, enforce_file_format=True)
    with browser_context(browser) as context:
        page = login(context, console_node, "operator")
        page.click("#nav-rules")
        page.wait_for_url(console_node.base_url + "/rules")
        assert page.locator("#rules-table tr[data-rule='chest']").count() == 1
        assert "Default rule set" in page.inner_text("#rules-source")
        page.fill("#dry-run-uid", study_uid)
        page.click("#dry-run-study button[type=submit]")
        page.wait_for_selector("#dry-run-result:not([hidden])", timeout=15_000)
        assert page.inner_text("#dry-run-verdict").startswith("Drafted by rule chest")
        row = page.locator("#dry-run-rules tr[data-rule='chest']")
        assert "yes" in row.inner_text()
        assert "Modality CR is one of CR, DX" in row.inner_text()
        assert "BodyPartExamined CHEST contains CHEST" in row.inner_text()
        page.set_input_files("#dry-run-upload", str(hand_path))
        page.click("#dry-run-file button[type=submit]")
        page.wait_for_selector("#dry-run-verdict:has-text('Skipped')", timeout=15_000)
        reason = page.inner_text("#dry-run-reason")
        assert "rule chest" in reason and "BodyPartExamined HAND" in reason
        assert "XR HAND LEFT" not in reason
        # a viewer sees the rules but cannot run a dry-run
    with browser_context(browser) as context:
        page = login(context, console_node, "viewer")
        page.goto(console_node.base_url + "/rules")
        assert page.locator("#rules-viewer-note").count() == 1
        assert page.locator("#dry-run-study button[type=submit]").is_disabled()
