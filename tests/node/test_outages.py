"""A database that does not answer: a C-STORE still gets an answer (0xA701) within a bound.

Issue #22 item 7 measured a C-STORE left unanswered for 60 s (the sender gave up) with
PostgreSQL black-holed, and 0xA701 only ~2 min later. Here the node's real storage SCP
(pynetdicom, :class:`node.runtime.ingest.IngestSink`) is fed by a real pynetdicom SCU on
loopback, in front of the real PostgreSQL at 127.0.0.1:5432 through :class:`BlackHoleProxy`,
a TCP proxy that forwards until told to black-hole: from then on it reads and drops every
byte and never answers, while the kernel keeps acknowledging TCP (a frozen server). SQLite
is held locked by a second real connection. The SCU waits up to 60 s, so a hang shows as a
failed bound.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from integration.status import StoreStatus
from node.db.engine import engine_from_settings, make_engine, make_session_factory
from node.db.migrate import upgrade
from node.runtime.ingest import IngestSink
from node.settings import ConfigError, Settings, load_settings
from tests.helpers import free_port
from tests.ingest.conftest import NODE_AET, PACS_AET, cxr_dataset, scu, serve_storage
from tests.node.conftest import PG_URL, pg_unreachable_reason

SCU_DIMSE_TIMEOUT = 60.0  # the defect: no answer before the sender gave up at 60 s
BOUND = 20.0  # measured ~10 s (ping 5 s + reconnect 5 s) with the default timeouts


class BlackHoleProxy:
    """A loopback TCP proxy to ``upstream`` that can black-hole and be restored.

    Black-holed: bytes from either side are read and dropped, and new connections are
    accepted but lead nowhere. Restored: new connections are forwarded again (black-holed
    ones stay dead).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listen = socket.create_server(("127.0.0.1", 0))
        self._listen.setblocking(False)
        self.port = int(self._listen.getsockname()[1])
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, None)
        self._peer: dict[socket.socket, socket.socket | None] = {}
        self._dead: set[socket.socket] = set()
        self._holed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-proxy", daemon=True)

    def start(self) -> BlackHoleProxy:
        self._thread.start()
        return self

    def blackhole(self) -> None:
        self._holed.set()

    def restore(self) -> None:
        self._dead.update(self._peer)  # connections that went silent stay silent
        self._holed.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in list(self._peer):
            s.close()
        self._listen.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                if key.data is None:
                    self._accept()
                    continue
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._sel.unregister(sock)
                    self._peer.pop(sock, None)
                    sock.close()
                    continue
                other = self._peer.get(sock)
                if other is not None and not self._holed.is_set() and sock not in self._dead:
                    with contextlib.suppress(OSError):  # the other side went away
                        other.sendall(data)

    def _accept(self) -> None:
        conn, _addr = self._listen.accept()
        up: socket.socket | None = None
        if not self._holed.is_set():
            up = socket.create_connection(self.upstream, timeout=5)
            up.setblocking(False)
            self._peer[up] = conn
            self._sel.register(up, selectors.EVENT_READ, "up")
        conn.setblocking(False)
        self._peer[conn] = up
        self._sel.register(conn, selectors.EVENT_READ, "down")


@dataclass
class Node:
    """The node's storage SCP on an engine built from its settings."""

    settings: Settings
    session_factory: sessionmaker[Session]
    engine: Any
    server: Any

    def store(self, n: int = 1) -> list[tuple[int | None, float]]:
        """C-STORE ``n`` new instances over one association: (status, seconds) each."""
        ae = scu(PACS_AET)
        ae.dimse_timeout = SCU_DIMSE_TIMEOUT
        assoc = ae.associate("127.0.0.1", self.settings.port, ae_title=NODE_AET)
        assert assoc.is_established
        out: list[tuple[int | None, float]] = []
        try:
            for _ in range(n):
                t0 = time.monotonic()
                rsp = assoc.send_c_store(cxr_dataset())
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                out.append((status, time.monotonic() - t0))
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
        return out


def start_node(tmp_path: Path, database_url: str, **overrides: Any) -> Node:
    settings = load_settings(
        ae_title=NODE_AET,
        port=free_port(),
        allowed_aes=PACS_AET,
        spool_dir=tmp_path / "spool",
        database_url=database_url,
        min_free_disk_mb=0,
        **overrides,
    )
    engine = engine_from_settings(settings)
    factory = make_session_factory(engine)
    sink = IngestSink(settings=settings, session_factory=factory)
    server = serve_storage(settings, sink, settings.port)
    return Node(settings, factory, engine, server)


@pytest.fixture
def proxied_pg(pg_schema_url: str) -> Iterator[tuple[BlackHoleProxy, str]]:
    """A migrated fresh schema, and its URL through a :class:`BlackHoleProxy`."""
    upgrade(pg_schema_url)
    proxy = BlackHoleProxy(("127.0.0.1", 5432)).start()
    url = pg_schema_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    assert url != pg_schema_url
    yield proxy, url
    proxy.stop()


@pytest.mark.postgres
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_blackholed_postgres_cstore_answered_a701_within_bound(
    tmp_path: Path, proxied_pg: tuple[BlackHoleProxy, str]
) -> None:
    proxy, url = proxied_pg
    node = start_node(tmp_path, url)  # default timeouts: connect 5 s, statement 10 s
    try:
        assert node.store() == [(0x0000, pytest.approx(0, abs=BOUND))]  # pool warmed up
        proxy.blackhole()
        [(status, seconds)] = node.store()
        assert status == StoreStatus.OUT_OF_RESOURCES_DATABASE  # 0xA701
        assert seconds < BOUND, f"answered after {seconds:.1f} s"
        spooled = lambda: len(list((tmp_path / "spool").rglob("*.dcm")))  # noqa: E731
        assert spooled() == 1  # the refused instance was not kept
        proxy.restore()  # the database is back: the next C-STORE is stored
        [(status, seconds)] = node.store()
        assert status == 0x0000 and seconds < BOUND
        assert spooled() == 2
    finally:
        node.server.shutdown()
        node.engine.dispose()


@pytest.mark.postgres
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_postgres_that_never_answers_the_connect_a701_within_bound(tmp_path: Path) -> None:
    if reason := pg_unreachable_reason():
        pytest.skip(reason)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts
        port = silent.getsockname()[1]
        node = start_node(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
        try:
            [(status, seconds)] = node.store()
        finally:
            node.server.shutdown()
            node.engine.dispose()
    assert status == StoreStatus.OUT_OF_RESOURCES_DATABASE
    assert seconds < 15.0, f"answered after {seconds:.1f} s"  # connect timeout: 5 s


@pytest.mark.postgres
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_statement_deadline_cuts_a_server_gone_silent_mid_transaction(
    proxied_pg: tuple[BlackHoleProxy, str],
) -> None:
    """A statement inside an open transaction (no checkout, no ping) is bounded too."""
    proxy, url = proxied_pg
    engine = make_engine(url, connect_timeout=2, statement_timeout=1.0)  # deadline 3 s
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
            proxy.blackhole()
            t0 = time.monotonic()
            with pytest.raises(OperationalError):
                conn.execute(text("SELECT 2"))
            seconds = time.monotonic() - t0
        assert 2.0 < seconds < 15.0, f"cut after {seconds:.1f} s"
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_live_server_cancels_a_slow_statement_and_keeps_url_options(pg_schema_url: str) -> None:
    engine = make_engine(pg_schema_url, statement_timeout=1.0)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "1s"
            assert (
                conn.execute(text("SHOW search_path")).scalar() == pg_schema_url.rsplit("%3D", 1)[1]
            )  # the URL's own options= survive
            t0 = time.monotonic()
            with pytest.raises(OperationalError, match="statement timeout"):
                conn.execute(text("SELECT pg_sleep(30)"))
            assert time.monotonic() - t0 < 15.0
    finally:
        engine.dispose()


@pytest.mark.timeout(120)
def test_locked_sqlite_cstore_answered_a701_within_the_statement_timeout(
    tmp_path: Path,
) -> None:
    db = tmp_path / "node.sqlite3"
    url = f"sqlite:///{db}"
    upgrade(url)
    node = start_node(tmp_path, url, database_statement_timeout_seconds=2.0)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        with node.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2000
        holder.execute("BEGIN IMMEDIATE")  # another writer keeps the lock (e.g. a stuck tool)
        [(status, seconds)] = node.store()
        assert status == StoreStatus.OUT_OF_RESOURCES_DATABASE
        # the old 30 s busy timeout answered at 30 s, the peer's usual DIMSE timeout
        assert 1.5 < seconds < 15.0, f"answered after {seconds:.1f} s"
        holder.execute("ROLLBACK")
        [(status, _)] = node.store()
        assert status == 0x0000
    finally:
        holder.close()
        node.server.shutdown()
        node.engine.dispose()


def test_pg_url_parameters_win_over_the_defaults() -> None:
    """Timeouts already in the URL are kept (no server needed: the engine connects lazily)."""
    from node.db.engine import _pg_connect_args

    url = f"{PG_URL}?connect_timeout=9&options=-csearch_path%3Dx%20-cstatement_timeout%3D7"
    from sqlalchemy.engine import make_url

    args = _pg_connect_args(make_url(url), {}, 5, 10.0)
    assert "connect_timeout" not in args  # the URL's 9 stays
    assert "options" not in args  # the URL's statement_timeout stays
    assert args["keepalives"] == 1 and args["tcp_user_timeout"] == 12000


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"database_connect_timeout_seconds": 1}, "database_connect_timeout_seconds"),
        ({"database_statement_timeout_seconds": 0}, "database_statement_timeout_seconds"),
        ({"delivery_retry_hours": 0}, "delivery_retry_hours"),
        ({"delivery_max_attempts": 0}, "delivery_max_attempts"),
        ({"delivery_recheck_minutes": -1}, "delivery_recheck_minutes"),
        ({"job_backoff_seconds": 0}, "job_backoff_seconds"),
        ({"job_backoff_seconds": 60, "job_max_backoff_seconds": 30}, "job_max_backoff_seconds"),
    ],
)
def test_outage_settings_are_validated(overrides: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        load_settings(None, **overrides)


def test_outage_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_NODE_DATABASE_STATEMENT_TIMEOUT_SECONDS", "4.5")
    monkeypatch.setenv("CXR_NODE_DELIVERY_RETRY_HOURS", "48")
    monkeypatch.setenv("CXR_NODE_DELIVERY_MAX_ATTEMPTS", "12")
    s = load_settings(None)
    assert s.database_statement_timeout_seconds == 4.5
    assert s.delivery_retry_hours == 48 and s.delivery_max_attempts == 12
    assert load_settings(None, delivery_max_attempts=None).delivery_max_attempts is None
