"""The System page in real headless Chromium against a real node (#26, item 5).

An admin sees the disks with the refuse threshold, the database, the model's state and
warm-up, and filters and pages the audit log; a viewer has no System link and gets 403.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from node.db import system_views
from node.db.audit import add_audit
from tests.web.conftest import ConsoleNode, browser_context, check_png, login

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAGING_ACTOR = "system-page-test"


def _seed_audit(node: ConsoleNode, n: int) -> None:
    """``n`` audit rows by one actor, a minute apart, on a fixed day in 2031."""
    base = datetime(2031, 5, 6, 7, 0, tzinfo=UTC)
    with node.sessions() as session:
        for k in range(n):
            add_audit(
                session,
                actor=PAGING_ACTOR,
                action="test.system",
                target=f"item:{k}",
                detail={"k": k},
                now=base + timedelta(minutes=k),
            )
        session.commit()


def test_the_system_page(console_node: ConsoleNode, browser: Any, tmp_path: Path) -> None:
    node = console_node
    _seed_audit(node, 30)
    with browser_context(browser) as context:
        page = login(context, node, "admin")
        page.click("#nav-system")
        page.wait_for_url(node.base_url + "/system")
        assert page.title().startswith("System")

        # disks: the spool's file system with a bar and the refuse threshold marked
        assert page.locator("#threshold").inner_text() == f"{node.settings.min_free_disk_mb} MiB"
        spool_row = page.locator('#disks tr[data-disk="spool"]')
        assert str(node.settings.spool_dir.absolute()) in spool_row.inner_text()
        assert "iB" in spool_row.locator("td.free").inner_text()
        assert spool_row.locator("svg.disk-bar rect.used").count() == 1
        assert spool_row.locator("svg.disk-bar line.threshold").count() == 1
        label = spool_row.locator("svg.disk-bar text").text_content()
        assert label == "refuse threshold 16.0\u00a0MiB free"
        assert page.locator("#ingest-accepting").is_visible()
        assert page.locator('#disks tr[data-disk="database"]').count() == 1
        assert "iB" in page.locator("#database-size").inner_text()

        # model state and warm-up, health, activity chart
        assert page.locator("#system-model-state").inner_text() == "ready"
        assert page.locator("#model-warmup").inner_text() == "done"
        assert page.locator('#health tr[data-check="database"]').inner_text().find("ok") > 0
        assert page.locator("#activity svg.chart").count() == 1
        assert page.locator("#activity svg.chart polyline").count() == 3
        # the hourly retention chore may have run (60 s after start) in this shared node
        with node.sessions() as session:
            purge = system_views.last_purge(session)
        shown = page.locator("#last-purge").inner_text()
        if purge is None:
            assert shown == "none recorded"
        else:
            d = purge.detail
            assert f"{d['studies']} studies, {d['instances']} instances, {d['srs']} output" in shown
        page.screenshot(path=str(tmp_path / "system.png"), full_page=True)
        check_png(tmp_path / "system.png")

        # the audit log: filter by actor and action, then page
        page.fill("#audit-actor", PAGING_ACTOR)
        page.select_option("#audit-action", "test.system")
        page.select_option('select[name="per"]', "25")
        page.click("#audit-submit")
        page.wait_for_url("**/system?*")
        assert page.locator("#audit-total").inner_text().startswith("30 entries, page 1 of 2")
        rows = page.locator("#audit-log tbody tr")
        assert rows.count() == 25
        assert rows.first.locator("td.actor").inner_text() == PAGING_ACTOR
        assert "item:29" in rows.first.inner_text()
        page.click("#audit-older")
        page.wait_for_url("**page=2**")
        assert page.locator("#audit-log tbody tr").count() == 5
        assert "item:0" in page.locator("#audit-log tbody tr").last.inner_text()
        # a time window (UTC): 07:10 inclusive to 07:13 exclusive
        page.fill("#audit-since", "2031-05-06T07:10")
        page.fill("#audit-until", "2031-05-06T07:13")
        page.click("#audit-submit")
        page.wait_for_url("**since=**")
        targets = page.locator("#audit-log tbody tr td.uid").all_inner_texts()
        assert [t for t in targets if t.startswith("item:")] == ["item:12", "item:11", "item:10"]
        # the admin's own login is in the log as well (other tests' logins too)
        page.goto(node.base_url + "/system?action=session.create")
        assert set(page.locator("#audit-log tbody td.action").all_inner_texts()) == {
            "session.create"
        }
        assert node.actor("admin") in page.locator("#audit-log tbody td.actor").all_inner_texts()

    with browser_context(browser) as context:
        page = login(context, node, "viewer")
        assert page.locator("#nav-system").count() == 0
        response = page.goto(node.base_url + "/system")
        assert response is not None and response.status == 403
        assert response.headers["cache-control"] == "no-store"
        assert "admin" in page.locator("#error-detail").inner_text()
        assert page.locator("#audit-log").count() == 0
