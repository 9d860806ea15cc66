"""Engines and sessions: SQLite (WAL, busy timeout, foreign keys, BEGIN IMMEDIATE) or PostgreSQL.

On SQLite every transaction of a write session starts with ``BEGIN IMMEDIATE``: the write lock
is taken up front, so two writers (threads of the SCP, the scheduler, a worker) serialize at
``BEGIN`` under the busy timeout instead of failing on a read-to-write upgrade. Read-only
sessions (``make_session_factory(engine, read_only=True)``) use a deferred ``BEGIN`` and never
block writers (WAL).

Timeouts (``database_connect_timeout_seconds``, ``database_statement_timeout_seconds``): a
C-STORE is acknowledged only once its row is committed (PS3.4 B.2.3), so a database that does
not answer must turn into 0xA701 (Out of Resources) well within the peer's DIMSE timeout
instead of a hang. SQLite: the statement timeout is the busy timeout (how long a writer waits
for the lock). PostgreSQL: libpq ``connect_timeout``; the pool's wait for a free connection;
the server's ``statement_timeout``; TCP keepalives and ``tcp_user_timeout`` (a peer gone from
the network); and, for a server that accepts bytes but never answers (frozen, or a black hole
that still acknowledges TCP), a client-side deadline: :class:`_StatementDeadlines` shuts the
socket of a statement, commit, rollback or ping still running past its deadline, so psycopg
raises ``psycopg.OperationalError`` in the waiting thread and SQLAlchemy discards the
connection. libpq and psycopg have no client-side query timeout of their own.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from node.filemodes import FILE_MODE, make_private_dir, private_file, tighten

if TYPE_CHECKING:
    from node.settings import Settings

__all__ = [
    "DEADLINE_GRACE_SECONDS",
    "DEFAULT_CONNECT_TIMEOUT_SECONDS",
    "DEFAULT_STATEMENT_TIMEOUT_SECONDS",
    "NO_DEADLINE",
    "SQLITE_BUSY_TIMEOUT_MS",
    "engine_from_settings",
    "is_sqlite",
    "make_engine",
    "make_session_factory",
]

log = logging.getLogger(__name__)

#: Defaults of ``database_connect_timeout_seconds`` and ``database_statement_timeout_seconds``.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 5
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 10.0
#: SQLite busy timeout under the default statement timeout.
SQLITE_BUSY_TIMEOUT_MS = int(DEFAULT_STATEMENT_TIMEOUT_SECONDS * 1000)
#: The client-side deadline of a PostgreSQL statement is the server's ``statement_timeout``
#: plus this margin, so that a live server's own cancellation (a clean error) comes first.
DEADLINE_GRACE_SECONDS = 2.0
#: Execution option: ``conn.execution_options(**{NO_DEADLINE: True})`` exempts a connection
#: from the client-side deadline (migrations, which also ``SET LOCAL statement_timeout = 0``).
NO_DEADLINE = "cxr_no_deadline"
# TCP keepalive of PostgreSQL connections: a peer gone silent is noticed after about a minute
# (idle 30 s, then 3 probes 10 s apart) instead of the kernel's two hours.
_KEEPALIVE: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
_BEGIN_OPTION = "cxr_sqlite_begin"
_FRESH = "cxr_fresh"


def is_sqlite(engine_or_url: Engine | URL | str) -> bool:
    """Whether the engine or URL is SQLite."""
    if isinstance(engine_or_url, Engine):
        return engine_or_url.dialect.name == "sqlite"
    return make_url(engine_or_url).get_backend_name() == "sqlite"


def make_engine(
    url: str | URL,
    *,
    echo: bool = False,
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT_SECONDS,
    **kwargs: Any,
) -> Engine:
    """Create the engine for ``url``.

    SQLite: the parent directory of the file is created (0700 when missing) and the file is
    created or tightened to 0600, which SQLite gives its ``-wal``/``-shm`` files too (patient
    data, :mod:`node.filemodes`); each connection gets
    ``journal_mode=WAL``, ``busy_timeout``, ``foreign_keys=ON`` and ``synchronous=FULL``
    (an acknowledged C-STORE must survive power loss), and transactions begin with
    ``BEGIN IMMEDIATE`` unless the session is read-only; ``busy_timeout`` is
    ``statement_timeout`` and the wait for a pooled connection is ``connect_timeout``.
    PostgreSQL: libpq ``connect_timeout``, TCP keepalives and
    ``tcp_user_timeout``, the server's ``statement_timeout`` (``options=-c ...``; any of these
    already in the URL wins), ``pool_timeout = connect_timeout``, a ping of every reused
    connection at checkout bounded by ``connect_timeout`` (SQLAlchemy's ``pool_pre_ping``
    would wait forever on a silent server), and the client-side deadline
    ``statement_timeout + DEADLINE_GRACE_SECONDS`` on every statement, commit and rollback
    (see the module docstring). A timed-out statement raises an
    :class:`sqlalchemy.exc.OperationalError` (or :class:`sqlalchemy.exc.TimeoutError` for the
    pool), so callers see a :class:`sqlalchemy.exc.SQLAlchemyError` within a bound.

    Parameters
    ----------
    url
        SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg://...``).
    echo
        Log SQL (debugging only). Bound parameters (report text, job errors) are never
        logged nor put into exception messages: ``hide_parameters`` is on unless a caller
        passes ``hide_parameters=False``.
    connect_timeout
        Seconds to open a connection (PostgreSQL; libpq's minimum is 2) or to wait for a
        pooled one (both backends).
    statement_timeout
        Seconds a statement may run (PostgreSQL) or wait for the write lock (SQLite).
    **kwargs
        Passed to :func:`sqlalchemy.create_engine`.
    """
    if connect_timeout < 2:
        raise ValueError(f"connect_timeout must be at least 2 seconds, got {connect_timeout}")
    if not statement_timeout > 0:
        raise ValueError(f"statement_timeout must be > 0 seconds, got {statement_timeout}")
    u = make_url(url)
    kwargs.setdefault("hide_parameters", True)
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:" and not db.startswith("file:"):
            _private_sqlite_files(Path(db))
        connect_args = {"check_same_thread": False, "timeout": statement_timeout}
        connect_args.update(kwargs.pop("connect_args", {}))
        if db and db != ":memory:" and not db.startswith("file:") and "poolclass" not in kwargs:
            kwargs.setdefault("pool_timeout", connect_timeout)  # a file database: QueuePool
        engine = create_engine(u, echo=echo, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine, busy_timeout_ms=max(1, round(statement_timeout * 1000)))
        return engine
    connect_args = _pg_connect_args(
        u, kwargs.pop("connect_args", {}), connect_timeout, statement_timeout
    )
    kwargs.setdefault("pool_timeout", connect_timeout)
    engine = create_engine(u, echo=echo, connect_args=connect_args, **kwargs)
    _install_pg_deadlines(
        engine,
        statement_seconds=statement_timeout + DEADLINE_GRACE_SECONDS,
        ping_seconds=float(connect_timeout),
    )
    return engine


def engine_from_settings(settings: Settings, **kwargs: Any) -> Engine:
    """:func:`make_engine` for ``settings.database_url`` with the configured timeouts."""
    return make_engine(
        settings.database_url,
        connect_timeout=settings.database_connect_timeout_seconds,
        statement_timeout=settings.database_statement_timeout_seconds,
        **kwargs,
    )


def _private_sqlite_files(db: Path) -> None:
    """Create the database file 0600 before SQLite does (its journals inherit the mode)."""
    make_private_dir(db.parent)
    private_file(db)
    for suffix in ("-wal", "-shm", "-journal"):  # left by an earlier version or a crash
        tighten(db.with_name(db.name + suffix), FILE_MODE)


def _install_sqlite_hooks(engine: Engine, *, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN is deferred and late).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")


# --- PostgreSQL timeouts ----------------------------------------------------------------------


def _pg_connect_args(
    url: URL, given: dict[str, Any], connect_timeout: int, statement_timeout: float
) -> dict[str, Any]:
    """libpq parameters for the timeouts; a parameter already in the URL or given wins."""
    args = dict(given)

    def unset(name: str) -> bool:
        return name not in args and name not in url.query

    deadline_ms = round((statement_timeout + DEADLINE_GRACE_SECONDS) * 1000)
    defaults: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        **_KEEPALIVE,
        # written data unacknowledged this long: the peer is gone (Linux TCP_USER_TIMEOUT)
        "tcp_user_timeout": deadline_ms,
    }
    for name, value in defaults.items():
        if unset(name):
            args[name] = value
    query_options = url.query.get("options", "")
    if not isinstance(query_options, str):  # given several times: leave them as they are
        return args
    options = str(args.get("options", query_options))
    if "statement_timeout" not in options:
        ms = max(1, round(statement_timeout * 1000))
        args["options"] = f"{options} -c statement_timeout={ms}".strip()
    return args


class _StatementDeadlines:
    """Client-side deadlines of PostgreSQL round trips; one watchdog thread per engine.

    :meth:`arm` before a round trip, :meth:`disarm` after it. A round trip still running at
    its deadline (libpq transaction status ``ACTIVE``: a command sent, its result not yet
    read) has its socket shut down (``shutdown(2)`` on a duplicate of the descriptor): the
    waiting thread's psycopg call fails at once with ``OperationalError`` ("server closed the
    connection unexpectedly") and SQLAlchemy invalidates the connection. An idle connection
    is never touched. The thread runs while deadlines are armed and ends after a minute
    without any.
    """

    _IDLE_EXIT_SECONDS = 60.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, Any, float]] = {}
        self._thread: threading.Thread | None = None

    def arm(self, dbapi_conn: Any, seconds: float) -> None:
        """Start (or restart) the deadline of ``dbapi_conn``: ``seconds`` from now."""
        if dbapi_conn is None:
            return
        with self._cond:
            self._due[id(dbapi_conn)] = (time.monotonic() + seconds, dbapi_conn, seconds)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cxr-db-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def disarm(self, dbapi_conn: Any) -> None:
        """The round trip of ``dbapi_conn`` is over (or the connection is going away)."""
        if dbapi_conn is None:
            return
        with self._cond:
            self._due.pop(id(dbapi_conn), None)

    def _run(self) -> None:
        idle_since = time.monotonic()
        with self._cond:
            while True:
                now = time.monotonic()
                if not self._due:
                    if now - idle_since >= self._IDLE_EXIT_SECONDS:
                        self._thread = None
                        return
                    self._cond.wait(self._IDLE_EXIT_SECONDS)
                    continue
                idle_since = now
                for key, (deadline, conn, seconds) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[key]
                        _cut_if_active(conn, seconds)
                if self._due:
                    first = min(d for d, _c, _s in self._due.values())
                    self._cond.wait(max(0.01, first - time.monotonic()))


def _cut_if_active(dbapi_conn: Any, seconds: float) -> None:
    """Shut down the socket of a psycopg connection whose command is still unanswered."""
    try:
        status = dbapi_conn.info.transaction_status
        if getattr(status, "name", "") != "ACTIVE":
            return
        fd = dbapi_conn.fileno()
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception as exc:  # closed meanwhile: nothing left to cut
        log.debug("database deadline: connection already gone (%s)", type(exc).__name__)
        return
    log.warning(
        "database did not answer within %.1f s: connection closed, the operation fails",
        seconds,
    )


def _install_pg_deadlines(engine: Engine, *, statement_seconds: float, ping_seconds: float) -> None:
    deadlines = _StatementDeadlines()

    def exempt(conn: Any) -> bool:
        return bool(conn.get_execution_options().get(NO_DEADLINE))

    @event.listens_for(engine, "connect")
    def _on_connect(_dbapi_conn: Any, record: Any) -> None:
        record.info[_FRESH] = True

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        # a reused connection may lead to a server that vanished while it sat in the pool
        if record.info.pop(_FRESH, False):
            return
        deadlines.arm(dbapi_conn, ping_seconds)
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool discards it and opens a fresh connection
            raise DisconnectionError(f"database ping failed ({type(exc).__name__})") from exc
        finally:
            deadlines.disarm(dbapi_conn)

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, *_args: Any) -> None:
        if not exempt(conn):
            deadlines.arm(cursor.connection, statement_seconds)

    @event.listens_for(engine, "after_cursor_execute")
    def _after(_conn: Any, cursor: Any, *_args: Any) -> None:
        deadlines.disarm(cursor.connection)

    @event.listens_for(engine, "handle_error")
    def _error(ctx: Any) -> None:
        cursor = getattr(ctx, "cursor", None)  # absent when connecting failed
        if cursor is not None:
            deadlines.disarm(cursor.connection)

    # COMMIT / ROLLBACK: no event follows them; the deadline passes harmlessly once the
    # connection is idle again, and is dropped when the connection goes back to the pool
    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _end(conn: Any) -> None:
        if not exempt(conn) and not conn.invalidated:
            deadlines.arm(conn.connection.dbapi_connection, statement_seconds)

    @event.listens_for(engine, "reset")
    def _reset(dbapi_conn: Any, _record: Any, _state: Any) -> None:
        deadlines.arm(dbapi_conn, ping_seconds)  # the pool's ROLLBACK on return

    @event.listens_for(engine, "checkin")
    @event.listens_for(engine, "close")
    def _gone(dbapi_conn: Any, _record: Any) -> None:
        deadlines.disarm(dbapi_conn)

    @event.listens_for(engine, "invalidate")
    @event.listens_for(engine, "soft_invalidate")
    def _invalid(dbapi_conn: Any, _record: Any, _exc: Any) -> None:
        deadlines.disarm(dbapi_conn)

    @event.listens_for(engine, "close_detached")
    def _detached(dbapi_conn: Any) -> None:
        deadlines.disarm(dbapi_conn)


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
