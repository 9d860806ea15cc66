"""The receive log page in real headless Chromium against a real node: after a rejected
association (calling AE not allowed) and an association with a refused instance, the page
lists both with their outcome, status and reason, overall and per study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from node.db.models import Association
from tests.helpers import wait_for
from tests.web.conftest import ConsoleNode, browser_context, check_png, chest_file, login

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _scu(calling: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
    return ae


def _ended(node: ConsoleNode, calling: str) -> list[Association]:
    with node.sessions() as session:
        return list(
            session.scalars(
                select(Association).where(
                    Association.calling_ae == calling, Association.outcome != "open"
                )
            )
        )


def test_receive_log_after_a_refused_association(
    browser: Any, console_node: ConsoleNode, tmp_path: Path
) -> None:
    node, s = console_node, console_node.settings
    intruder = "INTRUDER" + generate_uid()[-6:].replace(".", "")
    assoc = _scu(intruder).associate(s.host, s.port, ae_title=s.ae_title)
    assert assoc.is_rejected
    # from the allowed PACS: an instance without Series Instance UID, refused 0xA902
    path, study = chest_file(tmp_path)
    ds = dcmread(path)
    del ds.SeriesInstanceUID
    assoc = _scu(node.pacs.ae_title).associate(s.host, s.port, ae_title=s.ae_title)
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0xA902
    assoc.release()
    wait_for(lambda: bool(_ended(node, intruder)), timeout=20)

    with browser_context(browser) as context:
        page = login(context, node, "viewer")
        page.click("#nav-receive-log")
        page.wait_for_url(node.base_url + "/receive-log", timeout=15_000)
        page.fill("#receive-ae", intruder)
        page.select_option("#receive-outcome", "rejected")
        page.click("#receive-submit")
        page.wait_for_selector("#receive-body tr[data-outcome='rejected']")
        rows = page.locator("#receive-body tr[data-outcome='rejected']")
        assert rows.count() == 1
        row_text = rows.first.inner_text()
        assert intruder in row_text and "rejected" in row_text
        assert "calling AE title not on the allow-list" in row_text
        assert "of 1" in page.inner_text("#receive-page-info")

        # the study's view: the association that sent the refused instance, with its reason
        page.goto(f"{node.base_url}/receive-log?study={study}")
        released = page.locator("#receive-body tr[data-outcome='released']")
        assert released.count() == 1
        assert node.pacs.ae_title in released.first.inner_text()
        assert "0xA902 × 1" in released.first.inner_text()
        refused = page.locator("#receive-body tr.refused-instance[data-status='0xA902']")
        assert refused.count() == 1
        refused_text = refused.first.inner_text()
        assert "Series Instance UID" in refused_text and study in refused_text
        shot = tmp_path / "receive-log.png"
        page.screenshot(path=str(shot), full_page=True)
        check_png(shot, min_height=300)
