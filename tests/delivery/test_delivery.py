"""The SR sender (node.runtime.delivery) against real peers: a pynetdicom storage SCP that is down
and comes back, one that never comes back, one that rejects the data set, Orthanc over
STOW-RS, a PACS and a STOW-RS server whose refusal quotes the patient, and two senders sharing
one PostgreSQL database."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli import app
from node.db import delivery_views
from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade
from node.db.models import Delivery, DeliveryState
from node.runtime.delivery import DeliveryComponent, enqueue_deliveries
from tests.delivery.conftest import (
    NodeDB,
    PacsSCP,
    SRFactory,
    delivery_settings,
    make_job,
    node_context,
    start_sender,
)
from tests.dicom.orthanc import OrthancServer
from tests.helpers import free_port, wait_for


def _start(
    senders: list[DeliveryComponent], db: NodeDB, tmp_path: Path, **overrides: object
) -> DeliveryComponent:
    settings = delivery_settings(db, tmp_path, **overrides)
    ctx = node_context(db, settings)
    component = start_sender(senders, ctx, poll_seconds=0.1)
    assert ctx.extras["delivery"] is component
    return component


@pytest.mark.integration
def test_pacs_down_then_back_gets_the_sr_exactly_once(
    node_db: NodeDB,
    tmp_path: Path,
    make_sr: SRFactory,
    pacs_factory: Callable[..., PacsSCP],
    senders: list[DeliveryComponent],
) -> None:
    port = free_port()
    dest = f"PACS@127.0.0.1:{port}"
    sr_path, sr_uid = make_sr("down-then-back")
    _start(senders, node_db, tmp_path, destinations=dest)
    job = make_job(node_db.factory)
    with node_db.factory() as s:
        (did,) = enqueue_deliveries(s, job_id=job, sr_path=sr_path, destinations=[dest])

    # the PACS is down: the sender retries with backoff, the row stays pending
    wait_for(lambda: node_db.delivery(did).attempts >= 3, timeout=60)
    row = node_db.delivery(did)
    assert row.state is DeliveryState.pending
    assert "cannot connect" in (row.last_error or "") and row.sent_at is None

    pacs = pacs_factory(port)  # back on the same port
    wait_for(lambda: node_db.delivery(did).state is DeliveryState.sent, timeout=60)
    senders[0].stop()  # no further send can happen after this
    row = node_db.delivery(did)
    assert row.sent_at is not None and row.last_error is None
    assert pacs.received == [sr_uid]
    assert pacs.calling == ["LLMCXR"]  # calling AE = settings.ae_title


@pytest.mark.integration
def test_destination_that_never_returns_ends_failed_with_reason(
    node_db: NodeDB,
    tmp_path: Path,
    make_sr: SRFactory,
    senders: list[DeliveryComponent],
) -> None:
    port = free_port()
    dest = f"PACS@127.0.0.1:{port}"
    sr_path, _ = make_sr("never-returns")
    _start(senders, node_db, tmp_path, destinations=dest, delivery_max_attempts=3)
    job = make_job(node_db.factory)
    with node_db.factory() as s:
        (did,) = enqueue_deliveries(s, job_id=job, sr_path=sr_path, destinations=[dest])
    wait_for(lambda: node_db.delivery(did).state is DeliveryState.failed, timeout=60)
    row = node_db.delivery(did)
    assert row.attempts == 3
    assert "gave up after 3 attempts" in (row.last_error or "")
    assert f"cannot connect to {dest}" in (row.last_error or "")

    # visible in `cxr-node status --json`
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE_")}
    env.update(
        {
            "CXR_NODE_DATABASE_URL": node_db.url,
            "CXR_NODE_SPOOL_DIR": str(tmp_path / "spool"),
            "CXR_NODE_API_PORT": str(free_port()),
        }
    )
    result = CliRunner().invoke(app, ["status", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["deliveries"] == {
        "pending": 0,
        "sent": 0,
        "failed": 1,
        "cancelled": 0,
    }


@pytest.mark.integration
def test_permanent_rejection_fails_without_retrying(
    node_db: NodeDB,
    tmp_path: Path,
    make_sr: SRFactory,
    pacs_factory: Callable[..., PacsSCP],
) -> None:
    pacs = pacs_factory(status=0xA900)  # Error: Data Set does not match SOP Class
    good = pacs_factory()
    sr_path, sr_uid = make_sr("rejected")
    settings = delivery_settings(node_db, tmp_path, destinations=[pacs.address, good.address])
    component = DeliveryComponent(node_context(node_db, settings))
    job = make_job(node_db.factory)
    missing_job = make_job(node_db.factory)
    with node_db.factory() as s:
        bad_id, good_id = enqueue_deliveries(
            s, job_id=job, sr_path=sr_path, destinations=settings.destinations
        )
        (missing_id,) = enqueue_deliveries(
            s, job_id=missing_job, sr_path=tmp_path / "gone.dcm", destinations=[good.address]
        )
    outcomes = {o.delivery_id: o for o in component.run_once()}
    try:
        assert set(outcomes) == {bad_id, good_id, missing_id}
        assert outcomes[bad_id].state == "failed" and outcomes[good_id].state == "sent"
        assert outcomes[good_id].sr_uid == sr_uid
        bad = node_db.delivery(bad_id)
        assert bad.state is DeliveryState.failed and bad.attempts == 1
        assert "0xA900" in (bad.last_error or "") and "permanent" in (bad.last_error or "")
        assert pacs.received == [sr_uid]  # one attempt only
        assert good.received == [sr_uid]
        missing = node_db.delivery(missing_id)
        assert missing.state is DeliveryState.failed
        assert "SR file missing" in (missing.last_error or "")
        assert "gone.dcm" in (missing.last_error or "")
        assert component.run_once() == []  # nothing left due
    finally:
        component.stop()


@pytest.mark.integration
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_stow_rs_to_orthanc(
    node_db: NodeDB,
    tmp_path: Path,
    make_sr: SRFactory,
    senders: list[DeliveryComponent],
) -> None:
    sr_path, sr_uid = make_sr("stow")
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        dest = orthanc.dicomweb_url
        _start(senders, node_db, tmp_path, destinations=dest)
        job = make_job(node_db.factory)
        with node_db.factory() as s:
            (did,) = enqueue_deliveries(s, job_id=job, sr_path=sr_path, destinations=[dest])
        wait_for(lambda: node_db.delivery(did).state is DeliveryState.sent, timeout=60)
        instance = orthanc.find_instance(sr_uid)
        assert instance is not None
        tags = orthanc.simplified_tags(instance)
        assert tags["SOPInstanceUID"] == sr_uid
        assert tags["VerificationFlag"] == "UNVERIFIED"
        assert len(orthanc.instances()) == 1


@contextmanager
def _quoting_stow_server(quote: str) -> Iterator[str]:
    """A STOW-RS stand-in on loopback answering every store 409 with a body quoting ``quote``
    (as a PACS that names the patient whose data it refused); yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output quiet
            return

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = json.dumps({"00000902": {"vr": "LO", "Value": [quote]}}).encode()
            self.send_response(409)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.integration
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_refusal_quoting_the_patient_is_not_logged_nor_stored(
    node_db: NodeDB,
    tmp_path: Path,
    make_sr: SRFactory,
    pacs_factory: Callable[..., PacsSCP],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PACS's Error Comment (0000,0902), with a failure or a warning status, and a STOW-RS
    server's error answer are the receiver's free text, which may quote the data set (a
    patient mismatch, say): like HL7 MSA-3/ERR-8 and FHIR diagnostics, they stay out of the
    log and of the delivery's ``last_error``, which name the status (before: the name and ID
    were in two log lines and three stored errors)."""
    sr_path, sr_uid = make_sr("refusal-quoting-the-patient")
    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    name, patient_id = str(sr.PatientName), str(sr.PatientID)
    quote = f"Patient {name} ({patient_id}) differs from the stored study"
    pacs = pacs_factory(status=0xA900, comment=quote[:64])
    coerced = pacs_factory(status=0xB000, comment=quote[:64])  # stored, with a warning
    with _quoting_stow_server(quote) as stow_url:
        destinations = [pacs.address, stow_url, coerced.address]
        settings = delivery_settings(node_db, tmp_path, destinations=destinations)
        component = DeliveryComponent(node_context(node_db, settings))
        job = make_job(node_db.factory)
        with node_db.factory() as s:
            ids = enqueue_deliveries(s, job_id=job, sr_path=sr_path, destinations=destinations)
        caplog.set_level(logging.DEBUG)
        try:
            outcomes = component.run_once()
        finally:
            component.stop()
    assert sorted(o.state for o in outcomes) == ["failed", "failed", "sent"], outcomes
    assert pacs.received == coerced.received == [sr_uid]
    errors = [node_db.delivery(i).last_error or "" for i in ids]
    assert "0xA900" in errors[0] and "HTTP 409" in errors[1] and "0xB000" in errors[2], errors
    said = [*errors, *(o.message for o in outcomes), caplog.text]
    for value in (name, patient_id, "CompressedSamples", "RG1"):
        assert not [text for text in said if value in text], value


@pytest.mark.integration
@pytest.mark.postgres
def test_two_senders_on_postgres_never_send_a_row_twice(
    pg_schema_url: str,
    tmp_path: Path,
    make_sr: SRFactory,
    pacs_factory: Callable[..., PacsSCP],
    senders: list[DeliveryComponent],
) -> None:
    upgrade(pg_schema_url)
    engine = make_engine(pg_schema_url)
    db = NodeDB(pg_schema_url, engine, make_session_factory(engine))
    pacs = pacs_factory(delay=0.02)
    n = 20
    files = [make_sr(f"pair-{i}") for i in range(n)]
    try:
        a = _start(senders, db, tmp_path, destinations=pacs.address)
        b = _start(senders, db, tmp_path, destinations=pacs.address)
        ids = []
        for path, _ in files:
            job = make_job(db.factory)
            with db.factory() as s:
                ids += enqueue_deliveries(s, job_id=job, sr_path=path, destinations=[pacs.address])
        wait_for(lambda: len(pacs.received) >= n, timeout=120)
        wait_for(lambda: all(db.delivery(i).state is DeliveryState.sent for i in ids), timeout=60)
        a.stop()
        b.stop()
        assert sorted(pacs.received) == sorted(uid for _, uid in files)  # each exactly once
        with db.factory() as s:
            rows = list(s.scalars(select(Delivery)))
            assert delivery_views.delivery_counts(s) == {
                "pending": 0,
                "sent": n,
                "failed": 0,
                "cancelled": 0,
            }
        assert all(r.attempts == 1 for r in rows)  # no row was claimed twice
        # both senders took part
        sent_by = [{o.delivery_id for o in c.outcomes if o.state == "sent"} for c in (a, b)]
        assert sent_by[0] and sent_by[1] and not (sent_by[0] & sent_by[1])
        assert sent_by[0] | sent_by[1] == set(ids)
    finally:
        engine.dispose()
