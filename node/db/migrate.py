"""Run the packaged Alembic migrations programmatically (``cxr-node db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from node.db.engine import make_engine

__all__ = ["MIGRATIONS_DIR", "alembic_config", "current_revision", "head_revision", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    """An Alembic ``Config`` pointing at the packaged migrations, bound to ``engine``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # configparser interpolation: a literal % must be doubled
    url = engine.url.render_as_string(hide_password=False).replace("%", "%%")
    cfg.set_main_option("sqlalchemy.url", url)
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(database_url: str | URL | Engine, revision: str = "head") -> str | None:
    """Create or migrate the database to ``revision``; return the revision reached.

    Safe to run from several processes at once on PostgreSQL (an advisory lock serializes
    them) and on SQLite (the migration runs in one ``BEGIN IMMEDIATE`` transaction).

    Parameters
    ----------
    database_url
        SQLAlchemy URL, or an engine from :func:`node.db.engine.make_engine`.
    revision
        Target revision, ``head`` by default.
    """
    engine = database_url if isinstance(database_url, Engine) else make_engine(database_url)
    try:
        command.upgrade(alembic_config(engine), revision)
        return current_revision(engine)
    finally:
        if not isinstance(database_url, Engine):
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None`` when never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest revision shipped with this package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()
