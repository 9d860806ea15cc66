"""A PACS outage longer than the old attempt count: deliveries are retried for a horizon,
then re-queued when the destination answers C-ECHO again (issue #22 item 8).

Real peers on loopback: the node's :class:`node.runtime.delivery.DeliveryComponent` sends to a port
where nothing listens (connection refused, a transient failure), then to a real pynetdicom
storage SCP (:class:`tests.delivery.conftest.PacsSCP`) started on that port; the re-check is
the node's own chore run by its real APScheduler (:class:`node.runtime.scheduler.NodeScheduler`).
The horizon and the back-off are shrunk to seconds; the defect (8 attempts, then ``failed``
for good) would show as at most 8 attempts and a row that never leaves ``failed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select, text

from node.db.migrate import upgrade
from node.db.models import AuditLog, DeliveryState
from node.runtime.delivery import DeliveryComponent, enqueue_deliveries
from node.runtime.scheduler import Chores, NodeScheduler
from node.settings import Settings
from tests.delivery.conftest import (
    NodeDB,
    PacsSCP,
    SRFactory,
    delivery_settings,
    make_job,
    node_context,
    start_sender,
)
from tests.helpers import free_port, wait_for

HORIZON_S = 4.0
OLD_MAX_ATTEMPTS = 8


def _settings(db: NodeDB, tmp_path: Path, dest: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "destinations": dest,
        "delivery_max_attempts": None,  # the horizon alone decides
        "delivery_backoff_seconds": 0.05,
        "delivery_max_backoff_seconds": 0.1,
        "delivery_retry_hours": HORIZON_S / 3600,
    }
    values.update(overrides)
    return delivery_settings(db, tmp_path, **values)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_pacs_down_is_retried_for_the_horizon_then_requeued_when_it_echoes(
    node_db: NodeDB,
    tmp_path: Path,
    make_sr: SRFactory,
    pacs_factory: Callable[..., PacsSCP],
    senders: list[DeliveryComponent],
) -> None:
    port = free_port()
    dest = f"PACS@127.0.0.1:{port}"
    settings = _settings(node_db, tmp_path, dest)
    component = start_sender(senders, node_context(node_db, settings), poll_seconds=0.05)
    sr_path, sr_uid = make_sr("horizon")
    with node_db.factory() as s:
        (did,) = enqueue_deliveries(
            s, job_id=make_job(node_db.factory), sr_path=sr_path, destinations=[dest]
        )
        # a permanent failure to the same destination: the SR file is gone
        (gone_id,) = enqueue_deliveries(
            s, job_id=make_job(node_db.factory), sr_path=tmp_path / "gone.dcm", destinations=[dest]
        )
    t0 = time.monotonic()
    wait_for(lambda: node_db.delivery(did).state is DeliveryState.failed, timeout=60)
    failed_after = time.monotonic() - t0
    row = node_db.delivery(did)
    assert row.attempts > OLD_MAX_ATTEMPTS  # the old fixed count gave up at 8
    assert failed_after >= HORIZON_S * 0.9  # not before the horizon
    assert row.queued_at is not None and row.last_attempt_at is not None
    assert (row.last_attempt_at - row.queued_at).total_seconds() >= HORIZON_S * 0.9
    assert f"gave up after {row.attempts} attempts" in (row.last_error or "")
    assert "cannot connect" in (row.last_error or "")
    assert row.permanent_failure is False
    gone = node_db.delivery(gone_id)
    assert gone.state is DeliveryState.failed and gone.permanent_failure is True

    chores = Chores(settings, node_db.factory)
    assert chores.recheck_deliveries() == {}  # still down: C-ECHO refused, nothing re-queued
    assert node_db.delivery(did).state is DeliveryState.failed

    pacs = pacs_factory(port)  # the PACS is back on its port
    scheduler = NodeScheduler(
        Chores(settings.model_copy(update={"delivery_recheck_minutes": 0.02}), node_db.factory)
    )  # every 1.2 s
    scheduler.start()
    try:
        wait_for(lambda: node_db.delivery(did).state is DeliveryState.sent, timeout=60)
    finally:
        scheduler.stop()
    component.stop()
    assert pacs.received == [sr_uid]  # delivered once
    row = node_db.delivery(did)
    assert row.attempts == 1 and row.last_error is None  # a fresh round after the re-queue
    gone = node_db.delivery(gone_id)
    assert gone.state is DeliveryState.failed  # permanent: not re-queued
    with node_db.factory() as s:
        [entry] = s.scalars(select(AuditLog).where(AuditLog.action == "delivery.requeue"))
    assert entry.actor == "system" and entry.target == f"destination:{dest}"
    assert entry.detail == {"count": 1, "deliveries": [did], "reason": "C-ECHO answered"}


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_recheck_contacts_only_configured_destinations(
    node_db: NodeDB,
    tmp_path: Path,
    make_sr: SRFactory,
    pacs_factory: Callable[..., PacsSCP],
) -> None:
    removed = pacs_factory()  # answers, but is no longer in the configuration
    kept = pacs_factory()
    settings = _settings(node_db, tmp_path, kept.address, delivery_max_attempts=1)
    component = DeliveryComponent(node_context(node_db, settings))
    sr_path, _ = make_sr("configured-only")
    with node_db.factory() as s:
        ids = enqueue_deliveries(
            s,
            job_id=make_job(node_db.factory),
            sr_path=sr_path,
            destinations=[f"PACS@127.0.0.1:{free_port()}", removed.address],
        )
    removed.stop()  # down for the first (and only, max 1) attempt of both
    try:
        outcomes = component.run_once()
    finally:
        component.stop()
    assert {o.state for o in outcomes} == {"failed"}
    assert "gave up after 1 attempts" in (node_db.delivery(ids[1]).last_error or "")
    pacs_factory(removed.port)  # back, but not configured any more
    assert Chores(settings, node_db.factory).recheck_deliveries() == {}
    assert {node_db.delivery(i).state for i in ids} == {DeliveryState.failed}


def test_migration_marks_old_permanent_failures(db_url: str) -> None:
    """Rows failed before revision 0004 keep their meaning: permanent stays permanent."""
    upgrade(db_url, "0003")
    from sqlalchemy import create_engine

    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies (id, study_instance_uid, state, instance_count, "
                    "series_count, first_received_at, last_received_at, receiving_since, "
                    "forced_completion) VALUES (1, '1.2.3', 'complete', 0, 0, :t, :t, :t, false)"
                ),
                {"t": "2026-01-01 00:00:00"},
            )
            conn.execute(
                text(
                    "INSERT INTO jobs (id, study_id, state, priority, attempts, max_attempts, "
                    "created_at, updated_at) VALUES (1, 1, 'done', 0, 1, 3, :t, :t)"
                ),
                {"t": "2026-01-01 00:00:00"},
            )
            for i, (state, error) in enumerate(
                [
                    ("failed", "permanent failure: rejected 0xA900"),
                    ("failed", "SR file missing: outputs/x.dcm no longer exists"),
                    ("failed", "gave up after 8 attempts; last error: cannot connect"),
                    ("sent", None),
                ],
                start=1,
            ):
                conn.execute(
                    text(
                        "INSERT INTO deliveries (id, job_id, destination, kind, state, attempts, "
                        "last_error, created_at) VALUES (:i, 1, :d, 'dimse', :s, 1, :e, :t)"
                    ),
                    {"i": i, "d": f"P{i}@h:104", "s": state, "e": error, "t": "2026-01-01"},
                )
        upgrade(db_url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, permanent_failure FROM deliveries"))
            flags = {int(r[0]): bool(r[1]) for r in rows}
        assert flags == {1: True, 2: True, 3: False, 4: False}
    finally:
        engine.dispose()
