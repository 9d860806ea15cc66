"""The receive log, end to end: a real pynetdicom SCU against the node's real storage SCP
(assembled by ``node.runtime.service``), the log in SQL (SQLite and PostgreSQL), its
retention chore and the API's filters and paging (uvicorn, real tokens).

Associations: accepted with two instances and one refused (0xA902), rejected by the access
policy (calling AE not allowed) and by pynetdicom (called AE), aborted after one instance.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from integration.status import StoreStatus
from node.api.server import make_api_server
from node.db import receive_log as receive_db
from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade
from node.db.models import Association, AuditLog, Instance, RefusedInstance, utcnow
from node.runtime.scheduler import Chores
from node.runtime.service import NodeContext, _build_scp
from node.services.context import ServiceContext
from node.services.tokens import create_token
from node.settings import Settings
from tests.helpers import free_port, wait_for
from tests.ingest.conftest import NODE_AET, PACS_AET, cxr_dataset, scp_settings, scu
from tests.node.conftest import db_url, pg_schema_url  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration]


@dataclass
class LoggedNode:
    """The node's storage SCP with its receive log, as ``cxr-node serve`` builds it."""

    port: int
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    server: Any

    def associations(self) -> list[Association]:
        """Every association row, oldest first."""
        with self.sessions() as s:
            return list(s.scalars(select(Association).order_by(Association.id)))

    def association(self, association_id: int) -> Association:
        """One association row as stored now."""
        with self.sessions() as s:
            row = s.get(Association, association_id)
            assert row is not None
            return row

    def refused(self) -> list[RefusedInstance]:
        """Every refused instance row, oldest first."""
        with self.sessions() as s:
            return list(s.scalars(select(RefusedInstance).order_by(RefusedInstance.id)))

    def instance(self, sop_uid: str) -> Instance:
        """The instance row of ``sop_uid``."""
        with self.sessions() as s:
            row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).first()
            assert row is not None
            return row

    def wait_ended(self, n: int) -> list[Association]:
        """Wait until there are ``n`` rows and none is open; return them."""
        wait_for(
            lambda: (
                len(rows := self.associations()) == n and all(r.outcome != "open" for r in rows)
            ),
            timeout=20,
        )
        return self.associations()


def start_logged_node(tmp_path: Path, url: str, **overrides: Any) -> LoggedNode:
    """Migrate ``url`` and start the SCP of :func:`node.runtime.service._build_scp`."""
    port = free_port()
    settings = scp_settings(tmp_path, url, port, **overrides)
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    ae, handlers = _build_scp(settings, sessions)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    return LoggedNode(port, settings, engine, sessions, server)


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[LoggedNode]:  # noqa: F811
    """The logged SCP on SQLite and (marked postgres) PostgreSQL."""
    n = start_logged_node(tmp_path, db_url)
    yield n
    n.server.shutdown()
    n.engine.dispose()


def _send_session(node: LoggedNode) -> tuple[str, list[str], str]:
    """Accepted association: two instances stored, one refused (no Series Instance UID).

    Returns the study UID, the stored SOP Instance UIDs and the refused one.
    """
    good = [cxr_dataset(), cxr_dataset()]
    study = str(good[0].StudyInstanceUID)
    good[1].StudyInstanceUID = study
    bad = cxr_dataset(study_uid=study)
    del bad.SeriesInstanceUID
    assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (*good, bad)]
    finally:
        assoc.release()
    assert statuses == [0, 0, StoreStatus.MISSING_SERIES_INSTANCE_UID]
    return study, [str(ds.SOPInstanceUID) for ds in good], str(bad.SOPInstanceUID)


def _send_rejected(node: LoggedNode, *, calling: str = "STRANGER", called: str = NODE_AET) -> None:
    assoc = scu(calling).associate("127.0.0.1", node.port, ae_title=called)
    assert assoc.is_rejected


def _send_aborted(node: LoggedNode) -> str:
    ds = cxr_dataset()
    assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.abort()
    return str(ds.SOPInstanceUID)


def test_every_association_is_logged(node: LoggedNode) -> None:
    study, stored, refused_uid = _send_session(node)
    _send_rejected(node)  # the access policy: calling AE not on the allow-list
    _send_rejected(node, calling=PACS_AET, called="NOTME")  # pynetdicom: called AE
    aborted_sop = _send_aborted(node)
    rows = node.wait_ended(4)

    ok, policy, called, aborted = rows
    assert (ok.calling_ae, ok.called_ae, ok.address, ok.tls) == (
        PACS_AET,
        NODE_AET,
        "127.0.0.1",
        False,
    )
    assert ok.port is not None and ok.port > 0
    assert ok.outcome == "released" and ok.reason is None
    assert ok.ended_at is not None and ok.ended_at >= ok.started_at
    assert (ok.accepted, ok.refused) == (2, 1)
    assert ok.statuses == {"0x0000": 2, "0xA902": 1}
    assert [node.instance(uid).association_id for uid in stored] == [ok.id, ok.id]

    [bad] = node.refused()
    assert bad.association_id == ok.id
    assert (bad.study_uid, bad.sop_instance_uid) == (study, refused_uid)
    assert bad.sop_class_uid == SecondaryCaptureImageStorage
    assert bad.status == StoreStatus.MISSING_SERIES_INSTANCE_UID
    assert bad.reason is not None and "Series Instance UID" in bad.reason
    assert "Test" not in bad.reason and "INGEST" not in bad.reason  # no patient data

    assert (policy.calling_ae, policy.outcome) == ("STRANGER", "rejected")
    assert policy.reason == "calling AE title not on the allow-list"
    assert policy.ended_at is not None and policy.accepted == policy.refused == 0

    assert (called.calling_ae, called.called_ae, called.outcome) == (PACS_AET, "NOTME", "rejected")
    assert called.reason == "called AE title not recognised"

    assert aborted.outcome == "aborted" and aborted.ended_at is not None
    assert (aborted.accepted, aborted.refused, aborted.statuses) == (1, 0, {"0x0000": 1})
    assert node.instance(aborted_sop).association_id == aborted.id

    # the read side: filters and paging
    with node.sessions() as s:

        def ids(**kw: Any) -> tuple[list[int], int]:
            found, total = receive_db.list_associations(s, receive_db.ReceiveLogFilter(**kw))
            return [r.id for r in found], total

        assert ids() == ([aborted.id, called.id, policy.id, ok.id], 4)
        assert ids(study_uid=study) == ([ok.id], 1)
        assert ids(calling_ae="stran") == ([policy.id], 1)
        assert ids(outcome="rejected") == ([called.id, policy.id], 2)
        assert ids(limit=2, offset=1) == ([called.id, policy.id], 4)
        assert ids(since=ok.started_at + timedelta(days=1)) == ([], 0)
        assert ids(until=policy.started_at) == ([ok.id], 1)
        detail = receive_db.association_detail(s, ok.id)
        assert detail is not None and detail.studies == [study]
        assert [r.status_hex for r in detail.refused_instances] == ["0xA902"]
        assert receive_db.association_detail(s, 10**6) is None


@contextmanager
def _viewer_api(node: LoggedNode) -> Iterator[httpx.Client]:
    """The node's API and console, served for the test: a client with a viewer's token."""
    node.settings.prepare_runtime()
    ctx = NodeContext(node.settings, node.engine, node.sessions, "test", threading.Event())
    server = make_api_server(ctx)
    server.start()
    try:
        api = ServiceContext(
            settings=node.settings,
            read_sessions=make_session_factory(node.engine, read_only=True),
            write_sessions=node.sessions,
        )
        _, secret = create_token(api, name="rl-viewer", role="viewer", actor="test")
        base = f"http://{node.settings.api_host}:{node.settings.api_port}"
        auth = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=base, headers=auth, timeout=30) as client:
            yield client
    finally:
        server.stop()


def test_receive_log_api(tmp_path: Path) -> None:
    node = start_logged_node(
        tmp_path, f"sqlite:///{tmp_path / 'node.sqlite3'}", api_port=free_port()
    )
    try:
        study, _, refused_uid = _send_session(node)
        _send_rejected(node)
        ok, policy = node.wait_ended(2)
        with _viewer_api(node) as c:
            with httpx.Client(base_url=c.base_url, timeout=30) as anon:
                assert anon.get("/api/receive-log").status_code == 401
            page = c.get("/api/receive-log").json()
            assert page["total"] == 2 and [a["id"] for a in page["items"]] == [policy.id, ok.id]
            page = c.get("/api/receive-log", params={"limit": 1, "offset": 1}).json()
            assert (page["total"], page["limit"], page["offset"]) == (2, 1, 1)
            assert [a["id"] for a in page["items"]] == [ok.id]
            page = c.get("/api/receive-log", params={"study_uid": study}).json()
            assert [a["id"] for a in page["items"]] == [ok.id]
            assert page["items"][0]["statuses"] == {"0x0000": 2, "0xA902": 1}
            page = c.get("/api/receive-log", params={"outcome": "rejected"}).json()
            assert page["items"][0]["reason"] == "calling AE title not on the allow-list"
            page = c.get("/api/receive-log", params={"calling_ae": "pacs"}).json()
            assert [a["id"] for a in page["items"]] == [ok.id]
            since = (policy.started_at + timedelta(seconds=1)).isoformat()
            assert c.get("/api/receive-log", params={"since": since}).json()["total"] == 0
            assert c.get("/api/receive-log", params={"outcome": "lost"}).status_code == 422
            one = c.get(f"/api/receive-log/{ok.id}").json()
            assert one["association"]["outcome"] == "released"
            assert one["studies"] == [study]
            [r] = one["refused_instances"]
            assert (r["sop_instance_uid"], r["status"], r["status_hex"]) == (
                refused_uid,
                int(StoreStatus.MISSING_SERIES_INSTANCE_UID),
                "0xA902",
            )
            assert c.get("/api/receive-log/999999").status_code == 404
    finally:
        node.server.shutdown()
        node.engine.dispose()


def test_retention_purges_old_associations(node: LoggedNode) -> None:
    _, stored, _ = _send_session(node)
    _send_rejected(node)
    node.wait_ended(2)
    settings = node.settings.model_copy(update={"retention_days": 0, "receive_log_days": 90})
    later = utcnow() + timedelta(days=89)
    assert Chores(settings, node.sessions, clock=lambda: later).purge_receive_log() == 0
    assert len(node.associations()) == 2
    much_later = utcnow() + timedelta(days=91)
    Chores(settings, node.sessions, clock=lambda: much_later).apply_retention()
    assert node.associations() == [] and node.refused() == []
    # the instances stay, without their association
    assert [node.instance(uid).association_id for uid in stored] == [None, None]
    with node.sessions() as s:
        audit = s.scalars(select(AuditLog).where(AuditLog.action == "retention.receive_log")).one()
    assert audit.detail is not None and audit.detail["associations"] == 2
    off = node.settings.model_copy(update={"receive_log_days": 0})
    assert Chores(off, node.sessions, clock=lambda: much_later).purge_receive_log() == 0


def test_log_failure_never_fails_a_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = start_logged_node(tmp_path, f"sqlite:///{tmp_path / 'node.sqlite3'}")
    try:
        with node.engine.begin() as conn:  # the receive log's table is gone (renamed)
            conn.execute(text("ALTER TABLE associations RENAME TO associations_gone"))
        ds = cxr_dataset()
        with caplog.at_level(logging.INFO):
            assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE_AET)
            assert assoc.is_established
            assert int(assoc.send_c_store(ds).Status) == 0
            assoc.release()
        assert node.instance(str(ds.SOPInstanceUID)).association_id is None
        wait_for(lambda: "receive log: association not recorded" in caplog.text, timeout=10)
        assert "receive log: association not recorded (OperationalError)" in caplog.text
        assert "Test^Ingest" not in caplog.text and "INGEST-1" not in caplog.text
    finally:
        node.server.shutdown()
        node.engine.dispose()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # the SCU's data set
def test_receive_log_page_opens_the_study_of_a_refused_uid(tmp_path: Path) -> None:
    """An instance refused for its invalid Study Instance UID (0xA901) is listed with a link
    to that study's receive log; the link opens it (not a 422) and the study's view lists the
    association that sent it, as ``GET /api/receive-log?study_uid=`` does."""
    node = start_logged_node(
        tmp_path, f"sqlite:///{tmp_path / 'node.sqlite3'}", api_port=free_port()
    )
    try:
        bad = cxr_dataset()
        bad.StudyInstanceUID = "1.2.826.0.1.3680043.10.4242.X1"  # letters: not a UID
        assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(bad).Status) == StoreStatus.MISSING_STUDY_INSTANCE_UID
        finally:
            assoc.release()
        [sent] = node.wait_ended(1)
        [refused] = node.refused()
        assert refused.study_uid == "1.2.826.0.1.3680043.10.4242.X1"
        with _viewer_api(node) as c:
            listed = c.get("/receive-log")
            assert listed.status_code == 200
            link = "/receive-log?study=1.2.826.0.1.3680043.10.4242.X1&amp;per=50&amp;page=1"
            assert link in listed.text  # the refused row links to its study's view
            study_page = c.get(link.replace("&amp;", "&"))
            assert study_page.status_code == 200, study_page.text
            assert f'data-association-id="{sent.id}"' in study_page.text
            api_page = c.get("/api/receive-log", params={"study_uid": refused.study_uid})
            assert [a["id"] for a in api_page.json()["items"]] == [sent.id]
    finally:
        node.server.shutdown()
        node.engine.dispose()


def test_receive_log_page_takes_the_last_day_of_the_calendar(tmp_path: Path) -> None:
    """``date_to`` is a whole day: the last one a date input takes (9999-12-31) lists every
    association up to its end, instead of failing with a 500 (the day after it is past
    what a date holds)."""
    node = start_logged_node(
        tmp_path, f"sqlite:///{tmp_path / 'node.sqlite3'}", api_port=free_port()
    )
    try:
        _send_rejected(node)
        [rejected] = node.wait_ended(1)
        with _viewer_api(node) as c:
            page = c.get("/receive-log", params={"date_to": "9999-12-31"})
            assert page.status_code == 200, page.text
            assert f'data-association-id="{rejected.id}"' in page.text
            none = c.get("/receive-log", params={"date_from": "9999-12-31"})
            assert none.status_code == 200, none.text
            assert f'data-association-id="{rejected.id}"' not in none.text
    finally:
        node.server.shutdown()
        node.engine.dispose()
