"""Migration 0002: API tokens, web sessions, one delivery per (job, destination)."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from node.db.engine import make_engine, make_session_factory
from node.db.migrate import head_revision, upgrade
from node.db.models import ApiRole, ApiToken, Delivery, DeliveryKind, utcnow


def _job(conn_engine) -> int:  # type: ignore[no-untyped-def]
    now = utcnow()
    with conn_engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO studies (study_instance_uid, state, instance_count, series_count, "
                "first_received_at, last_received_at, receiving_since, forced_completion) "
                "VALUES ('1.2.3', 'complete', 0, 0, :t, :t, :t, false)"
            ),
            {"t": now.replace(tzinfo=None)},
        )
        c.execute(
            text(
                "INSERT INTO jobs (study_id, state, priority, attempts, max_attempts, "
                "created_at, updated_at) SELECT id, 'done', 0, 1, 3, :t, :t FROM studies"
            ),
            {"t": now.replace(tzinfo=None)},
        )
        return int(c.execute(text("SELECT id FROM jobs")).scalar_one())


def test_delivery_unique_per_job_and_destination(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        job_id = _job(engine)
        factory = make_session_factory(engine)
        with factory() as s:
            for dest in ("A@h:1", "B@h:1"):
                s.add(
                    Delivery(
                        job_id=job_id,
                        destination=dest,
                        kind=DeliveryKind.dimse,
                        created_at=utcnow(),
                    )
                )
            s.commit()
        with factory() as s, pytest.raises(IntegrityError):
            s.add(
                Delivery(
                    job_id=job_id, destination="A@h:1", kind=DeliveryKind.dimse, created_at=utcnow()
                )
            )
            s.commit()
        with factory() as s, pytest.raises(IntegrityError):
            for _ in range(2):
                s.add(
                    ApiToken(
                        name="t", role=ApiRole.viewer, token_hash="a" * 64, created_at=utcnow()
                    )
                )
            s.commit()
    finally:
        engine.dispose()


def test_upgrade_from_0001_keeps_the_first_of_duplicate_deliveries(db_url: str) -> None:
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    try:
        job_id = _job(engine)
        with engine.begin() as c:
            for _ in range(3):
                c.execute(
                    text(
                        "INSERT INTO deliveries (job_id, destination, kind, state, attempts, "
                        "created_at) VALUES (:j, 'A@h:1', 'dimse', 'pending', 0, :t)"
                    ),
                    {"j": job_id, "t": utcnow().replace(tzinfo=None)},
                )
        assert upgrade(engine) == head_revision()
        with engine.connect() as c:
            ids = c.execute(text("SELECT id FROM deliveries")).scalars().all()
        assert len(ids) == 1
        assert {"api_tokens", "api_sessions"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
