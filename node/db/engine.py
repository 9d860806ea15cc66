"""Engines and sessions: SQLite (WAL, busy timeout, foreign keys, BEGIN IMMEDIATE) or PostgreSQL.

On SQLite every transaction of a write session starts with ``BEGIN IMMEDIATE``: the write lock
is taken up front, so two writers (threads of the SCP, the scheduler, a worker) serialize at
``BEGIN`` under the busy timeout instead of failing on a read-to-write upgrade. Read-only
sessions (``make_session_factory(engine, read_only=True)``) use a deferred ``BEGIN`` and never
block writers (WAL).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "is_sqlite", "make_engine", "make_session_factory"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
_BEGIN_OPTION = "cxr_sqlite_begin"


def is_sqlite(engine_or_url: Engine | URL | str) -> bool:
    """Whether the engine or URL is SQLite."""
    if isinstance(engine_or_url, Engine):
        return engine_or_url.dialect.name == "sqlite"
    return make_url(engine_or_url).get_backend_name() == "sqlite"


def make_engine(url: str | URL, *, echo: bool = False, **kwargs: Any) -> Engine:
    """Create the engine for ``url``.

    SQLite: the parent directory of the file is created; each connection gets
    ``journal_mode=WAL``, ``busy_timeout``, ``foreign_keys=ON`` and ``synchronous=FULL``
    (an acknowledged C-STORE must survive power loss), and transactions begin with
    ``BEGIN IMMEDIATE`` unless the session is read-only. PostgreSQL: ``pool_pre_ping``.

    Parameters
    ----------
    url
        SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg://...``).
    echo
        Log SQL (debugging only: parameters may include UIDs).
    """
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(u, echo=echo, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, echo=echo, **kwargs)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN is deferred and late).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """A session factory bound to ``engine`` (``expire_on_commit=False``).

    Parameters
    ----------
    engine
        From :func:`make_engine`.
    read_only
        On SQLite, begin transactions with a deferred ``BEGIN`` (no write lock); callers
        must not write through such sessions.
    """
    bind = engine
    if read_only and is_sqlite(engine):
        bind = engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
    return sessionmaker(bind=bind, expire_on_commit=False)
