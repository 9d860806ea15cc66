"""The admin's view of the queue through the API: study identity and search, sorting and
paging, delivery state beside job state, failed deliveries and re-sending them, bulk
actions, each job's history, and the objects it made (download, SR, PDF, viewer link).

Real SQLite, the real API server over HTTP, real DICOM files; nothing mocked.
"""

from __future__ import annotations

import json
from datetime import timedelta
from io import BytesIO
from typing import Any

import pytest
from pydicom import dcmread
from pypdf import PdfWriter
from sqlalchemy import select

from node.db import delivery_claims
from node.db import studies as studies_db
from node.db.models import (
    Delivery,
    DeliveryKind,
    DeliveryObject,
    DeliveryState,
    Job,
    JobEvent,
    Study,
    utcnow,
)
from node.runtime.header import read_header
from node.settings import load_settings
from tests.api.conftest import ApiEnv, Seeded, new_uid
from tests.helpers import node_draft_pdf, node_draft_sr, rg1_file
from tests.node.factories import record

pytestmark = pytest.mark.integration


def _identify(env: ApiEnv, seeded: Seeded, **identity: Any) -> None:
    """Give a seeded study its identity, as ingest records it."""
    with env.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == seeded.study_uid)).one()
        for name, value in identity.items():
            setattr(study, name, value)
        s.commit()


def _ids(page: dict[str, Any]) -> list[int]:
    return [j["id"] for j in page["items"]]


def test_ingest_records_the_study_identity(tmp_path: Any) -> None:
    """PatientName/ID, StudyDate, AccessionNumber and the modalities come from the header."""
    ds = dcmread(rg1_file())
    ds.PatientName = "DOE^JANE^Q"
    ds.PatientID = "MRN-4711"
    ds.StudyDate = "20261130"
    ds.AccessionNumber = "ACC123"
    path = tmp_path / "rg1.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = read_header(path)
    assert (header.patient_name, header.patient_id, header.study_date) == (
        "DOE^JANE^Q",
        "MRN-4711",
        "20261130",
    )
    assert header.accession_number == "ACC123"
    bad = record(study=new_uid(), study_date="30.11.2026")
    assert bad.study_date is None  # not a DA: not recorded


def test_search_sort_and_page(env: ApiEnv) -> None:
    a = env.seed("queued")
    b = env.seed("failed")
    c = env.seed("done", destination="PACS@10.0.0.9:104")
    _identify(
        env,
        a,
        patient_name="DOE^JANE",
        patient_id="MRN-1",
        accession_number="ACC-100",
        study_date="20261101",
        modalities="CR",
        study_description="CHEST PA",
    )
    _identify(
        env,
        b,
        patient_name="ROE^RICHARD",
        patient_id="MRN-2",
        accession_number="ACC-200",
        study_date="20261115",
        modalities="DX",
    )
    _identify(
        env,
        c,
        patient_name="DOE^JOHN",
        patient_id="X-3",
        accession_number="B-300",
        study_date="20261201",
        modalities="CR\\DX",
    )
    with env.client("viewer") as cl:

        def get(**params: Any) -> dict[str, Any]:
            r = cl.get("/api/jobs", params=params)
            assert r.status_code == 200, r.text
            return dict(r.json())

        row = get(q="jane")["items"][0]
        assert row["patient_name"] == "DOE^JANE" and row["patient_id"] == "MRN-1"
        assert row["accession_number"] == "ACC-100" and row["study_date"] == "20261101"
        assert _ids(get(q="doe jane")) == [a.job_id]  # every word must match
        assert set(_ids(get(q="DOE"))) == {a.job_id, c.job_id}
        assert _ids(get(q="acc-2")) == [b.job_id]  # accession, in part
        assert _ids(get(patient="x-3")) == [c.job_id]  # patient ID
        assert _ids(get(accession="B-3")) == [c.job_id]
        assert _ids(get(q=c.study_uid)) == [c.job_id]
        assert _ids(get(q="chest pa")) == [a.job_id]  # study description
        assert set(_ids(get(modality="DX"))) == {b.job_id, c.job_id}
        assert _ids(get(study_date_from="20261110", study_date_to="20261130")) == [b.job_id]
        assert get(q="100%")["total"] == 0  # LIKE wildcards are literal
        assert get(q="nobody")["total"] == 0
        assert _ids(get(sort="patient_name", order="asc")) == [a.job_id, c.job_id, b.job_id]
        assert _ids(get(sort="study_date", order="desc")) == [c.job_id, b.job_id, a.job_id]
        page = get(sort="accession", order="asc", limit=2, offset=2)
        assert page["total"] == 3 and _ids(page) == [c.job_id]
        # delivery state beside the job state
        done = get(q="DOE JOHN")["items"][0]
        assert (done["state"], done["delivery_state"], done["deliveries_failed"]) == (
            "done",
            "failed",
            1,
        )
        assert _ids(get(delivery="failed")) == [c.job_id]
        assert set(_ids(get(delivery="none"))) == {a.job_id, b.job_id}
        assert cl.get("/api/jobs", params={"study_date_from": "2026-11-01"}).status_code == 422
        assert cl.get("/api/jobs", params={"sort": "patient_id"}).status_code == 422


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_modality_filter_is_one_of_the_studys_modalities(
    make_env: Any, backend: str, request: pytest.FixtureRequest
) -> None:
    """``modality`` matches one of the study's modalities (``JobFilter``), not a part of
    one: CT finds the CT study, not the ophthalmic tomography (OCT) one; the queue page's
    Modality filter lists the same jobs."""
    url = request.getfixturevalue("pg_schema_url") if backend == "postgresql" else None
    env = make_env(url=url, model=False)
    ct, oct_, both = env.seed("queued"), env.seed("queued"), env.seed("queued")
    _identify(env, ct, modalities="CT")
    _identify(env, oct_, modalities="OCT")
    _identify(env, both, modalities="CR\\CT")
    with env.client("viewer") as cl:

        def listed(modality: str) -> set[int]:
            r = cl.get("/api/jobs", params={"modality": modality})
            assert r.status_code == 200, r.text
            return set(_ids(r.json()))

        def shown(modality: str) -> set[int]:
            r = cl.get("/", params={"modality": modality})
            assert r.status_code == 200, r.text
            ids = (ct.job_id, oct_.job_id, both.job_id)
            return {i for i in ids if f'<tr data-job-id="{i}"' in r.text}

        assert listed("CT") == shown("CT") == {ct.job_id, both.job_id}
        assert listed("ct") == {ct.job_id, both.job_id}
        assert listed("OCT") == shown("OCT") == {oct_.job_id}
        assert listed("C") == shown("C") == set()
        assert listed("CR") == {both.job_id}


def test_failed_deliveries_and_resend(env: ApiEnv) -> None:
    one = env.seed("done", destination="PACS@10.0.0.9:104")
    two = env.seed("done", destination="PACS@10.0.0.9:104")
    other = env.seed("done", destination="RIS@10.0.0.8:104")
    _identify(env, one, patient_name="DOE^JANE", accession_number="ACC-1")
    with env.client("viewer") as cl:
        page = cl.get("/api/deliveries/failed").json()
        assert page["total"] == 3
        assert {d["destination"]: d["failed"] for d in page["destinations"]} == {
            "PACS@10.0.0.9:104": 2,
            "RIS@10.0.0.8:104": 1,
        }
        item = next(i for i in page["items"] if i["job_id"] == one.job_id)
        assert item["patient_name"] == "DOE^JANE" and item["accession_number"] == "ACC-1"
        assert item["last_error"] == "association rejected" and item["attempts"] == 8
        assert item["last_attempt_at"]
        pacs = cl.get("/api/deliveries/failed", params={"destination": "RIS@10.0.0.8:104"})
        assert [i["job_id"] for i in pacs.json()["items"]] == [other.job_id]
        assert cl.post("/api/deliveries/resend", json={"ids": [item["id"]]}).status_code == 403
    with env.client("operator") as cl:
        r = cl.post("/api/deliveries/resend", json={"ids": [item["id"]]})
        assert r.status_code == 200 and r.json()["queued"] == [item["id"]]
        all_pacs = cl.post("/api/deliveries/resend", json={"destination": "PACS@10.0.0.9:104"})
        assert len(all_pacs.json()["queued"]) == 1  # the other PACS row; the first is pending
        assert (
            cl.post("/api/deliveries/resend", json={"ids": [1], "destination": "X"}).status_code
            == 422
        )
        assert cl.post("/api/deliveries/resend", json={}).status_code == 422
        left = cl.get("/api/deliveries/failed").json()
        assert [i["job_id"] for i in left["items"]] == [other.job_id]
    with env.sessions() as s:
        rows = s.scalars(select(Delivery).where(Delivery.job_id.in_([one.job_id, two.job_id])))
        assert {(r.state, r.attempts, r.last_error) for r in rows} == {
            (DeliveryState.pending, 0, None)
        }
    audit = env.audit("delivery.resend")
    assert [a.target for a in audit] == [f"job:{one.job_id}", f"job:{two.job_id}"]
    assert all(a.actor == env.actor("operator") for a in audit)


def test_bulk_actions(env: ApiEnv) -> None:
    f1, f2 = env.seed("failed"), env.seed("failed")
    queued = env.seed("queued")
    with env.client("viewer") as cl:
        body = {"action": "retry", "ids": [f1.job_id]}
        assert cl.post("/api/jobs/bulk", json=body).status_code == 403
    with env.client("operator") as cl:
        r = cl.post(
            "/api/jobs/bulk", json={"action": "retry", "ids": [f1.job_id, queued.job_id, f2.job_id]}
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [(x["job_id"], x["ok"]) for x in results] == [
            (f1.job_id, True),
            (queued.job_id, False),
            (f2.job_id, True),
        ]
        assert "queued" in results[1]["error"]
        r = cl.post("/api/jobs/bulk", json={"action": "cancel", "ids": [f1.job_id, 999999]})
        assert [(x["ok"], bool(x["error"])) for x in r.json()["results"]] == [
            (True, False),
            (False, True),
        ]
        assert cl.post("/api/jobs/bulk", json={"action": "purge", "ids": [1]}).status_code == 422
        assert cl.post("/api/jobs/bulk", json={"action": "retry", "ids": []}).status_code == 422
    assert env.job(f1.job_id).state.value == "cancelled"
    assert env.job(f2.job_id).state.value == "queued"
    assert len(env.audit("job.requeue")) == 2 and len(env.audit("job.cancel")) == 1


def test_job_history(env: ApiEnv) -> None:
    """Each step of a job is an event: received, queued (rule), claimed, stages, done, and
    every delivery attempt; operator actions come from the audit log."""
    done = env.seed("done", destination="PACS@10.0.0.9:104")
    with env.sessions() as s:
        row = Delivery(
            job_id=done.job_id,
            destination="RIS@10.0.0.8:104",
            kind=DeliveryKind.dimse,
            object=DeliveryObject.sr,
            state=DeliveryState.pending,
            attempts=1,
            created_at=utcnow(),
        )
        s.add(row)
        s.commit()
        delivery_id = row.id
    with env.sessions() as s:
        assert delivery_claims.mark_retry(
            s, delivery_id, error="peer busy", next_attempt_at=utcnow() + timedelta(seconds=5)
        )
        assert delivery_claims.mark_sent(s, delivery_id)
    with env.client("operator") as cl:
        assert cl.post(f"/api/jobs/{done.job_id}/resend").status_code == 200
        d = cl.get(f"/api/jobs/{done.job_id}").json()
    kinds = [e["kind"] for e in d["events"]]
    assert kinds[:4] == ["received", "queued", "claimed", "done"], kinds
    assert d["events"][0]["actor"] == "PACS"  # the calling AE
    assert d["events"][1]["detail"]["rule"]
    assert d["events"][3]["actor"] == "test-worker"
    attempts = [e["detail"] for e in d["events"] if e["kind"] == "delivery"]
    assert [(a["outcome"], a["error"]) for a in attempts] == [
        ("retry", "peer busy"),
        ("sent", None),
    ]
    assert attempts[0]["destination"] == "RIS@10.0.0.8:104" and attempts[0]["object"] == "sr"
    assert [a["action"] for a in d["audit"]] == ["job.resend"]
    with env.sessions() as s:  # the history goes with the job
        s.delete(s.get(Job, done.job_id))
        s.commit()
        assert not s.scalars(select(JobEvent).where(JobEvent.job_id == done.job_id)).all()


def test_finish_records_stage_timings(env: ApiEnv) -> None:
    from node.db import withdrawals as withdrawals_db

    running = env.seed("running")
    with env.sessions() as s:
        withdrawals_db.finish_job(
            s,
            running.job_id,
            owner="test-worker",
            stages={"load_s": 0.25, "decode_s": 1.5, "tokens": 40.0},
        )
    with env.client("viewer") as cl:
        events = cl.get(f"/api/jobs/{running.job_id}").json()["events"]
    stages = [(e["detail"]["name"], e["detail"]["seconds"]) for e in events if e["kind"] == "stage"]
    assert stages == [("load", 0.25), ("decode", 1.5)]  # counts are not stages
    assert events[-1]["kind"] == "done"


def _write_objects(env: ApiEnv, seeded: Seeded) -> tuple[str, int]:
    """The job's draft SR in outputs/ and an Encapsulated PDF delivery; returns the SR UID
    and the PDF delivery's id."""
    image = dcmread(BytesIO(env.template))
    image.StudyInstanceUID = seeded.study_uid
    sr = node_draft_sr(
        image, findings="Clear lungs.", impression="Normal.", version="1", series_number=90
    )
    outputs = env.settings.spool_dir / "outputs"
    outputs.mkdir(exist_ok=True)
    sr.save_as(outputs / f"{sr.SOPInstanceUID}.dcm", enforce_file_format=True)
    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    buf = BytesIO()
    writer.write(buf)
    pdf = buf.getvalue()
    enc = node_draft_pdf(pdf, image, model="LLM-CXR", version="1", created_at=utcnow())
    enc.save_as(outputs / "report.pdf.dcm", enforce_file_format=True)
    with env.sessions() as s:
        job = s.get(Job, seeded.job_id)
        assert job is not None
        job.sr_sop_instance_uid = str(sr.SOPInstanceUID)
        row = Delivery(
            job_id=seeded.job_id,
            destination="PACS@10.0.0.9:104",
            kind=DeliveryKind.dimse,
            object=DeliveryObject.pdf,
            object_uid=str(enc.SOPInstanceUID),
            state=DeliveryState.sent,
            attempts=1,
            sr_path="outputs/report.pdf.dcm",
            created_at=utcnow(),
        )
        s.add(row)
        s.commit()
        return str(sr.SOPInstanceUID), row.id


def test_objects_download_and_pdf(env: ApiEnv) -> None:
    done = env.seed("done")
    sr_uid, pdf_key = _write_objects(env, done)
    with env.client("viewer") as cl:
        d = cl.get(f"/api/jobs/{done.job_id}").json()
        assert [(o["key"], o["object"], o["present"]) for o in d["objects"]] == [
            ("sr", "sr", True),
            (str(pdf_key), "pdf", True),
        ]
        assert d["viewer_url"] is None
        r = cl.get(f"/api/jobs/{done.job_id}/objects/sr")
        assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
        assert r.headers["cache-control"] == "no-store"
        got = dcmread(BytesIO(r.content))
        assert str(got.SOPInstanceUID) == sr_uid and got.VerificationFlag == "UNVERIFIED"
        pdf = cl.get(f"/api/jobs/{done.job_id}/objects/{pdf_key}/pdf")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
        assert pdf.headers["content-type"] == "application/pdf"
        assert cl.get(f"/api/jobs/{done.job_id}/objects/sr/pdf").status_code == 422
        assert cl.get(f"/api/jobs/{done.job_id}/objects/12345").status_code == 404
        assert cl.get(f"/api/jobs/{done.job_id}/objects/..%2Fnode.sqlite3").status_code in (
            404,
            422,
        )
        (env.settings.spool_dir / "outputs" / f"{sr_uid}.dcm").unlink()
        assert cl.get(f"/api/jobs/{done.job_id}/objects/sr").status_code == 410
        listed = cl.get(f"/api/jobs/{done.job_id}").json()["objects"]
        assert listed[0]["present"] is False
    with env.client() as anonymous:
        assert anonymous.get(f"/api/jobs/{done.job_id}/objects/{pdf_key}").status_code == 401


def test_viewer_link(make_env: Any) -> None:
    env = make_env(
        model=False,
        viewer_url_template="https://ohif.example/viewer?StudyInstanceUIDs={study_uid}&acc={accession}",
    )
    done = env.seed("done")
    _identify(env, done, accession_number="A&B 1")
    with env.client("viewer") as cl:
        url = cl.get(f"/api/jobs/{done.job_id}").json()["viewer_url"]
    assert url == (f"https://ohif.example/viewer?StudyInstanceUIDs={done.study_uid}&acc=A%26B%201")
    for bad in ("javascript:alert(1)", "https://x/{patient_name}", "https://x/{study_uid"):
        with pytest.raises(ValueError, match="viewer_url_template"):
            load_settings(None, viewer_url_template=bad)


def test_record_keeps_first_identity_and_collects_modalities(env: ApiEnv) -> None:
    study = new_uid()
    with env.sessions() as s:
        studies_db.record_instance_detailed(
            s, record(study=study, modality="CR", patient_name="DOE^JANE", patient_id="1")
        )
        studies_db.record_instance_detailed(
            s,
            record(study=study, series=f"{study}.2", modality="dx", patient_name="OTHER^NAME"),
        )
        studies_db.record_instance_detailed(s, record(study=study, modality="CR"))
        row = s.scalars(select(Study).where(Study.study_instance_uid == study)).one()
        assert (row.patient_name, row.patient_id, row.modalities) == ("DOE^JANE", "1", "CR\\DX")


def test_cli_search_history_and_failed_deliveries(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cxr-node jobs list --search/--delivery``, ``jobs show`` (history) and ``deliveries
    failed|resend`` on the same database as the API."""
    from typer.testing import CliRunner

    from node.cli import app

    env = make_env(model=False)
    done = env.seed("done", destination="PACS@10.0.0.9:104")
    other = env.seed("queued")
    _identify(env, done, patient_name="DOE^JANE", accession_number="ACC-77")
    monkeypatch.delenv("CXR_NODE_CONFIG", raising=False)
    monkeypatch.setenv("CXR_NODE_DATABASE_URL", env.settings.database_url)
    monkeypatch.setenv("CXR_NODE_SPOOL_DIR", str(env.settings.spool_dir))
    monkeypatch.setenv("COLUMNS", "400")  # rich tables: room for every column
    runner = CliRunner()

    r = runner.invoke(app, ["jobs", "list", "--json", "--search", "jane doe"])
    assert r.exit_code == 0, r.output
    assert [j["id"] for j in json.loads(r.stdout)] == [done.job_id]
    r = runner.invoke(app, ["jobs", "list", "--json", "--delivery", "none"])
    assert [j["id"] for j in json.loads(r.stdout)] == [other.job_id]
    assert runner.invoke(app, ["jobs", "list", "--delivery", "lost"]).exit_code == 2
    human = runner.invoke(app, ["jobs", "list", "--search", "ACC-77"])
    assert "ACC-77" in human.stdout and "failed" in human.stdout

    shown = runner.invoke(app, ["jobs", "show", str(done.job_id)])
    assert shown.exit_code == 0, shown.output
    for kind in ("received", "queued", "claimed", "done"):
        assert f" {kind} " in shown.stdout

    r = runner.invoke(app, ["deliveries", "failed", "--json"])
    assert r.exit_code == 0, r.output
    failed = json.loads(r.stdout)
    assert failed["total"] == 1 and failed["destinations"] == {"PACS@10.0.0.9:104": 1}
    r = runner.invoke(app, ["deliveries", "resend", "--destination", "PACS@10.0.0.9:104"])
    assert r.exit_code == 0 and "1 deliveries queued again" in r.stdout
    # neither ids nor --destination, or both (the API's 422): bad usage, nothing re-sent
    for args in ([], ["1", "--destination", "PACS@10.0.0.9:104"]):
        r = runner.invoke(app, ["deliveries", "resend", *args])
        assert r.exit_code == 2 and "one of them" in r.output, (args, r.output)
    audit = env.audit("delivery.resend")
    assert len(audit) == 1 and audit[0].actor.startswith("cli:")
