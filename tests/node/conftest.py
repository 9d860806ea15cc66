"""Fixtures for the node's tests: a fresh database on SQLite and on PostgreSQL.

``db_url`` is parametrized: ``sqlite`` (a file in the test's tmp dir) and ``postgresql``
(127.0.0.1:5432/test, a fresh schema per test, dropped afterwards). The PostgreSQL variant
is skipped, with the reason printed, only when no server answers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade

PG_URL = os.environ.get("CXR_NODE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_pg_error: str | None = None
_pg_checked = False


def pg_unreachable_reason() -> str | None:
    """Why PostgreSQL cannot be used (``None`` when it answers); checked once."""
    global _pg_checked, _pg_error
    if not _pg_checked:
        _pg_checked = True
        try:
            eng = create_engine(PG_URL, connect_args={"connect_timeout": 3})
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
            eng.dispose()
        except Exception as exc:  # any failure means "not reachable here"
            _pg_error = f"PostgreSQL at {PG_URL} is not reachable: {type(exc).__name__}: {exc}"
    return _pg_error


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema (dropped afterwards)."""
    reason = pg_unreachable_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.sqlite3'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to head."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A write-session factory on the migrated database."""
    return make_session_factory(engine)
