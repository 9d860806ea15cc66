"""Every output object through the one delivery queue, to real receivers, and withdrawn.

One drafted study, three destinations: a pynetdicom Storage SCP that gets the
Comprehensive SR, the Basic Text SR and the Encapsulated PDF; an hl7apy MLLP listener
(STRICT parsing, real ACKs) that gets the ORU^R01; a loopback FHIR server that validates
the transaction Bundle with fhir.resources. Then the draft is withdrawn: the SCP gets an
IOCM Key Object Selection rejection note naming the three instances, the listener an ORU
with OBR-25 ``C``, the FHIR server the report ``entered-in-error``. dciodvfy checks every
DICOM object the node wrote. A study drafted again supersedes the earlier draft's objects
not yet sent to the destinations the new draft goes to.
"""

from __future__ import annotations

import json
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    KeyObjectSelectionDocumentStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from sqlalchemy import select

from integration.destinations import Hl7Destination
from integration.hl7_oru import message_control_id
from models.results import ReportDraft
from node.db import deliveries as deliveries_db
from node.db.deliveries import Outbound
from node.db.finals import draft_for
from node.db.jobs import JobConflict
from node.db.models import AuditLog, DeliveryObject, DeliveryState, Draft, Instance, Job
from node.runtime.completion import JobOutcome, _draft_text
from node.runtime.delivery import DeliveryComponent
from node.runtime.draft_objects import draft_reissue
from node.runtime.modelhost import ModelHost
from node.runtime.pipeline import run_batch
from node.runtime.withdrawal import _source, _stored_text, withdraw
from tests.helpers import free_port, require_binary
from tests.node.factories import T0, add_done_job
from tests.receivers import TOKEN, FhirReceiver, Receiver
from tests.worker.conftest import NodeEnv, make_cxr, make_env
from tests.worker.test_pipeline import OWNER, claim

CLASSES = (
    ComprehensiveSRStorage,
    BasicTextSRStorage,
    EncapsulatedPDFStorage,
    KeyObjectSelectionDocumentStorage,
)


class Scp:
    """A pynetdicom Storage SCP for the draft objects that keeps every dataset."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for uid in CLASSES:
            ae.add_supported_context(uid)
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        assert server is not None
        self._server = server

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(event.dataset)  # type: ignore[attr-defined]
        return 0x0000

    def by_class(self, uid: str) -> list[Dataset]:
        with self._lock:
            return [ds for ds in self.received if ds.SOPClassUID == uid]

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def scp() -> Iterator[Scp]:
    server = Scp()
    yield server
    server.stop()


@pytest.fixture
def out_env(
    tmp_path: Path,
    demo_bundle: Path,
    scp: Scp,
    hl7_listener: tuple[int, Receiver],
    fhir_server: tuple[str, FhirReceiver],
) -> Iterator[NodeEnv]:
    destinations = [
        {
            "kind": "dimse",
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": scp.port,
            "objects": ["sr", "basic-sr", "pdf"],
        },
        {
            "kind": "hl7",
            "host": "127.0.0.1",
            "port": hl7_listener[0],
            "receiving_application": "RIS",
            "receiving_facility": "RADIOLOGY",
        },
        {"kind": "fhir", "base_url": fhir_server[0], "bearer_token": TOKEN},
    ]
    env = make_env(
        f"sqlite:///{tmp_path}/node.sqlite3",
        tmp_path,
        demo_bundle,
        destinations=json.dumps(destinations),
    )
    yield env
    env.engine.dispose()


def _send_all(env: NodeEnv) -> None:
    sender = DeliveryComponent(env.context(), max_parallel=8)
    try:
        for _ in range(5):
            if not sender.run_once():
                break
    finally:
        sender.stop()


def _rejected(kos: Dataset) -> set[str]:
    """The SOP Instance UIDs a rejection note names."""
    return {
        item.ReferencedSOPInstanceUID
        for series in kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def _result_statuses(receiver: Receiver) -> list[str]:
    """OBR-25 (result status) of each ORU^R01 the MLLP listener received, in order."""
    return [
        m.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.to_er7()
        for m in receiver.received
    ]


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = require_binary("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]


def test_every_object_delivered_then_withdrawn(
    out_env: NodeEnv,
    model_host: ModelHost,
    scp: Scp,
    hl7_listener: tuple[int, Receiver],
    fhir_server: tuple[str, FhirReceiver],
) -> None:
    env = out_env
    study = env.add_study(view="PA")
    [job_id] = env.queue_all()
    assert claim(env) == job_id
    [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)
    assert outcome.status == "done", outcome.error

    rows = env.deliveries(job_id)
    assert sorted((r.kind.value, r.object.value) for r in rows) == [
        ("dimse", "basic-sr"),
        ("dimse", "pdf"),
        ("dimse", "sr"),
        ("fhir", "report"),
        ("hl7", "report"),
    ]
    spool = env.settings.spool_dir
    for row in rows:
        assert row.sr_path is not None and row.object_uid
        path = spool / row.sr_path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, row.object  # patient data
    _send_all(env)
    rows = env.deliveries(job_id)
    assert {r.state for r in rows} == {DeliveryState.sent}, [(r.object, r.last_error) for r in rows]

    # DICOM: three objects of the study, each in its own series, each marked a draft
    [sr] = scp.by_class(ComprehensiveSRStorage)
    [basic] = scp.by_class(BasicTextSRStorage)
    [pdf] = scp.by_class(EncapsulatedPDFStorage)
    assert {sr.StudyInstanceUID, basic.StudyInstanceUID, pdf.StudyInstanceUID} == {study}
    assert len({sr.SeriesInstanceUID, basic.SeriesInstanceUID, pdf.SeriesInstanceUID}) == 3
    for ds in (sr, basic, pdf):
        assert str(ds.SeriesDescription).startswith("AI DRAFT UNVERIFIED"), ds.SeriesDescription
    assert sr.SOPInstanceUID == outcome.sr_uid
    assert bytes(pdf.EncapsulatedDocument).startswith(b"%PDF-")
    for row in rows:
        if row.kind.value == "dimse":
            assert _dciodvfy_errors(spool / str(row.sr_path)) == [], row.object

    # HL7: one ORU, unverified result, for the RIS named in the destination
    receiver = hl7_listener[1]
    [oru] = receiver.received
    assert oru.msh.msh_5.to_er7() == "RIS" and oru.msh.msh_6.to_er7() == "RADIOLOGY"
    obr = oru.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_25.to_er7() == "R"
    # FHIR: one transaction with a partial (unverified) DiagnosticReport carrying the PDF
    fhir = fhir_server[1]
    assert fhir.problems == []
    [(method, _path, bundle)] = fhir.received
    assert method == "POST"
    report = _report(bundle)
    assert report["status"] == "partial"  # R4: "may be unverified"; preliminary is verified
    assert report["presentedForm"][0]["contentType"] == "application/pdf"

    # withdraw: every destination gets its withdrawal
    result = withdraw(
        env.settings,
        env.session_factory,
        job_id,
        actor="test:op",
        reason="sent for the wrong study",
    )
    assert result.cancelled == [] and result.skipped == {} and len(result.queued) == 3
    job = env.job(job_id)
    assert job.withdrawn_at is not None and job.withdrawn_by == "test:op"
    _send_all(env)
    withdrawals = [r for r in env.deliveries(job_id) if r.object is DeliveryObject.withdrawal]
    assert {r.state for r in withdrawals} == {DeliveryState.sent}
    [kos] = scp.by_class(KeyObjectSelectionDocumentStorage)
    assert kos.StudyInstanceUID == study
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
    assert _rejected(kos) == {sr.SOPInstanceUID, basic.SOPInstanceUID, pdf.SOPInstanceUID}
    [kos_row] = [r for r in withdrawals if r.kind.value == "dimse"]
    assert _dciodvfy_errors(spool / str(kos_row.sr_path)) == []
    assert len(receiver.received) == 2
    withdrawn = receiver.received[1].oru_r01_patient_result.oru_r01_order_observation.obr
    assert withdrawn.obr_25.to_er7() == "C"
    assert len(fhir.received) == 2 and fhir.problems == []
    last = json.dumps(fhir.received[1][2])
    assert "entered-in-error" in last

    with env.session_factory() as s:
        audit = [a for a in s.query(AuditLog).filter(AuditLog.action == "job.withdraw")]
    assert len(audit) == 1 and audit[0].target == f"job:{job_id}"
    with pytest.raises(JobConflict):
        withdraw(env.settings, env.session_factory, job_id, actor="test:op", reason="again")


def test_withdraw_before_sending_cancels_and_sends_nothing(
    out_env: NodeEnv,
    model_host: ModelHost,
    scp: Scp,
    hl7_listener: tuple[int, Receiver],
) -> None:
    env = out_env
    env.add_study(view="PA")
    [job_id] = env.queue_all()
    assert claim(env) == job_id
    [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)
    assert outcome.status == "done", outcome.error

    result = withdraw(env.settings, env.session_factory, job_id, actor="test:op", reason="wrong")
    assert len(result.cancelled) == 5 and result.queued == []
    _send_all(env)
    assert {r.state for r in env.deliveries(job_id)} == {DeliveryState.cancelled}
    assert scp.received == [] and hl7_listener[1].received == []


def test_withdraw_needs_a_drafted_job(out_env: NodeEnv) -> None:
    env = out_env
    env.add_study(view="PA")
    [job_id] = env.queue_all()
    with pytest.raises(JobConflict, match="no draft"):
        withdraw(env.settings, env.session_factory, job_id, actor="test:op", reason="x")
    with pytest.raises(ValueError, match="reason"):
        withdraw(env.settings, env.session_factory, job_id, actor="test:op", reason="  ")


def _ordered_cxr(env: NodeEnv, study_uid: str) -> Path:
    """A chest CR of ``study_uid`` with the RIS order's numbers and requested procedure."""
    path = make_cxr(env.tmp / f"src-{study_uid}.dcm", study_uid=study_uid)
    ds = pydicom.dcmread(path)
    ds.PlacerOrderNumberImagingServiceRequest = "PLC-4711"
    ds.FillerOrderNumberImagingServiceRequest = "FIL-0815"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "36643-5", "LN"
    code.CodeMeaning = "XR Chest 2 Views"
    request = Dataset()
    request.RequestedProcedureID = "RP-1"
    request.RequestedProcedureCodeSequence = [code]
    ds.RequestAttributesSequence = [request]
    ds.save_as(path, enforce_file_format=True)
    return path


def _draft_and_send(env: NodeEnv, model_host: ModelHost, source: Path) -> JobOutcome:
    """Ingest ``source``, draft its study (one job) and send every object; the outcome."""
    env.ingest(source)
    return _draft_received(env, model_host)


def _draft_received(env: NodeEnv, model_host: ModelHost) -> JobOutcome:
    """Queue the one study received, draft it (one job) and send every object; the outcome."""
    [job_id] = env.queue_all()
    assert claim(env) == job_id
    [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)
    assert outcome.status == "done", outcome.error
    _send_all(env)
    return outcome


def _send_corrected(env: NodeEnv, source: Path, **values: str) -> None:
    """Send ``source`` again with other ``values`` (a replaced duplicate: same SOP Instance
    UID, other content, which reopens a finished study)."""
    ds = pydicom.dcmread(source)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(source, enforce_file_format=True)
    env.ingest(source)


def _withdraw_without_the_image(env: NodeEnv, job_id: int) -> None:
    """Delete the study's one image from the spool, withdraw job ``job_id``'s draft (built
    from the draft SR then) and send the withdrawals."""
    with env.session_factory() as s:
        [instance] = s.scalars(select(Instance))
    (env.settings.spool_dir / instance.spool_path).unlink()  # the image read is gone
    result = withdraw(env.settings, env.session_factory, job_id, actor="test:op", reason="wrong")
    assert result.skipped == {}
    _send_all(env)


def test_withdrawal_built_from_the_sr_names_the_drafts_order(
    out_env: NodeEnv, model_host: ModelHost, hl7_listener: tuple[int, Receiver]
) -> None:
    """Once the image read has left the spool the HL7 withdrawal is built from the draft SR;
    it must still name the order the draft's ORU named (ORC-2/OBR-2 placer, ORC-3/OBR-3
    filler, OBR-4 service), or the RIS cannot find the results it is to mark wrong (HL7
    v2.5.1 section 4.5.1, 7.4.1)."""
    env = out_env
    job_id = _draft_and_send(env, model_host, _ordered_cxr(env, generate_uid())).job_id
    _withdraw_without_the_image(env, job_id)
    draft, withdrawal = hl7_listener[1].received
    orders = [m.oru_r01_patient_result.oru_r01_order_observation for m in (draft, withdrawal)]
    assert orders[0].orc.orc_2.to_er7() == "PLC-4711"
    assert orders[0].obr.obr_4.to_er7().startswith("36643-5^")
    for field in ("orc_2", "orc_3"):
        assert getattr(orders[1].orc, field).to_er7() == getattr(orders[0].orc, field).to_er7()
    for field in ("obr_2", "obr_3", "obr_4", "obr_18"):
        assert getattr(orders[1].obr, field).to_er7() == getattr(orders[0].obr, field).to_er7()
    assert orders[1].obr.obr_25.to_er7() == "C"


@pytest.mark.parametrize(
    ("impression", "text"),
    [("", ""), ("  ", "No acute disease."), ("  Clear lungs. ", "FINDINGS: x IMPRESSION: y")],
)
def test_withdrawal_carries_the_impression_the_draft_sent(
    out_env: NodeEnv, impression: str, text: str
) -> None:
    """A withdrawal sends the draft's lines again, marked wrong (HL7 OBX-11 ``W``): built from
    the stored row, its impression is what the draft's objects said, also for a draft
    without text (it said "(no text)" where the draft said "(no text generated)") or with
    an impression of spaces only (it said "(no text)" where the draft sent its whole text)."""
    sent = _draft_text(
        ReportDraft(
            model_name="LLM-CXR-DEMO",
            model_version="v1",
            demo=True,
            prompt="",
            settings={},
            text=text,
            findings=None,
            impression=impression,
            timings={},
        )
    )
    with out_env.session_factory() as s:
        job = add_done_job(s, generate_uid(), at=T0)
        s.add(
            Draft(
                job_id=job.id,
                task="report",
                full_text=text,
                impression=impression,
                model_name="LLM-CXR-DEMO",
                model_version="v1",
                created_at=T0,
            )
        )
        s.flush()
        stored = _stored_text(s, job)
    assert stored is not None and stored.impression == sent.impression != ""


def _report(bundle: dict[str, Any]) -> dict[str, Any]:
    """The DiagnosticReport of a FHIR transaction Bundle the node sent."""
    [report] = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    return dict(report)


def _draft_report(bundle: dict[str, Any]) -> str | None:
    """The DiagnosticReport identifier of a FHIR transaction Bundle that sends a draft
    (``partial``), else ``None`` (a withdrawal)."""
    report = _report(bundle)
    return str(report["identifier"][0]["value"]) if report["status"] == "partial" else None


@pytest.mark.parametrize("withdrawn", [True, False])
def test_the_same_draft_after_a_withdrawal_is_a_new_issue(
    out_env: NodeEnv,
    model_host: ModelHost,
    scp: Scp,
    hl7_listener: tuple[int, Receiver],
    fhir_server: tuple[str, FhirReceiver],
    withdrawn: bool,
) -> None:
    """A draft sent for the wrong patient is withdrawn, the image is sent again corrected (a
    replaced duplicate reopens the study) and drafted again: the same instances, the same
    text. Its objects must not take the withdrawn UIDs again: the PACS keeps hiding what the
    IOCM rejection note rejected, the RIS has seen the MSH-10, and the FHIR conditional
    update would turn the ``entered-in-error`` report back into a draft. Without the
    withdrawal the same draft stays one object (the control)."""
    env = out_env
    source = _ordered_cxr(env, generate_uid())
    one = _draft_and_send(env, model_host, source)
    if withdrawn:
        withdraw(env.settings, env.session_factory, one.job_id, actor="test:op", reason="wrong")
        _send_all(env)
    _send_corrected(env, source, PatientName="Corrected^Name")
    two = _draft_received(env, model_host)
    assert {r.state for r in env.deliveries(two.job_id)} == {DeliveryState.sent}

    oru_ids = [
        m.msh.msh_10.to_er7()
        for m in hl7_listener[1].received
        if m.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.to_er7() == "R"
    ]
    reports = [r for _m, _p, b in fhir_server[1].received if (r := _draft_report(b))]
    srs = [ds.SOPInstanceUID for ds in scp.by_class(ComprehensiveSRStorage)]
    assert len(oru_ids) == len(reports) == len(srs) == 2
    if withdrawn:
        assert two.sr_uid != one.sr_uid
        assert srs == [one.sr_uid, two.sr_uid] and oru_ids[0] != oru_ids[1]
        assert reports == [f"urn:oid:{one.sr_uid}", f"urn:oid:{two.sr_uid}"]
        [sr] = [
            ds for ds in scp.by_class(ComprehensiveSRStorage) if ds.SOPInstanceUID == two.sr_uid
        ]
        [predecessor] = sr.PredecessorDocumentsSequence
        referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert [r.ReferencedSOPInstanceUID for r in referenced] == [one.sr_uid]
        basic = {ds.SOPInstanceUID for ds in scp.by_class(BasicTextSRStorage)}
        pdfs = {ds.SOPInstanceUID for ds in scp.by_class(EncapsulatedPDFStorage)}
        assert len(basic) == len(pdfs) == 2  # every object of the draft is a new issue
    else:
        assert two.sr_uid == one.sr_uid and srs == [one.sr_uid] * 2
        assert oru_ids[0] == oru_ids[1] and reports == [f"urn:oid:{one.sr_uid}"] * 2


def test_each_withdrawal_moves_the_same_draft_to_its_next_issue() -> None:
    """Issue ``n`` is the first whose SR UID was not withdrawn: a draft withdrawn twice is
    issued a third time; other studies' or drafts' withdrawals do not move it."""
    text = _draft_text(
        ReportDraft(
            model_name="LLM-CXR-DEMO",
            model_version="v1",
            demo=True,
            prompt="",
            settings={},
            text="No acute disease.",
            findings=None,
            impression="No acute disease.",
            timings={},
        )
    )
    study, inputs = generate_uid(), [generate_uid()]

    def uid(reissue: int) -> str:
        return text.ids("sr", study, inputs=inputs, reissue=reissue)["sop_instance_uid"]

    def issue(*withdrawn: str) -> int:
        return draft_reissue(study, text, inputs=inputs, withdrawn=set(withdrawn))

    assert issue() == 0 and issue(generate_uid()) == 0
    assert issue(uid(0)) == 1 and issue(uid(0), uid(1)) == 2
    assert issue(uid(1)) == 0  # issue 0 was never withdrawn


@pytest.mark.parametrize("corrected", [True, False])
def test_a_withdrawal_names_the_patient_the_draft_went_to(
    out_env: NodeEnv,
    model_host: ModelHost,
    hl7_listener: tuple[int, Receiver],
    fhir_server: tuple[str, FhirReceiver],
    corrected: bool,
) -> None:
    """The image read is sent again with corrected demographics (a replaced duplicate) after
    its draft went out; the draft is then withdrawn. The withdrawal must name the patient
    and order the draft named (PID-3, PID-5, the DiagnosticReport's subject), or the RIS
    and the EHR cannot find the results it marks wrong, and the corrected patient's record
    gets a withdrawal of results it never had. The image, unchanged, is what it is built
    from otherwise (the control)."""
    env = out_env
    source = _ordered_cxr(env, generate_uid())
    job_id = _draft_and_send(env, model_host, source).job_id
    if corrected:
        _send_corrected(env, source, PatientName="Corrected^Name", PatientID="NEW-0815")
    with env.session_factory() as s:
        built_from = _source(s, env.settings, s.get_one(Job, job_id))
    assert built_from is not None
    assert built_from.Modality == ("SR" if corrected else "CR")

    result = withdraw(env.settings, env.session_factory, job_id, actor="test:op", reason="wrong")
    assert result.skipped == {}
    _send_all(env)
    draft, withdrawal = hl7_listener[1].received
    for field in ("pid_3", "pid_5", "pid_7"):
        sent = getattr(draft.oru_r01_patient_result.oru_r01_patient.pid, field).to_er7()
        withdrawn = getattr(withdrawal.oru_r01_patient_result.oru_r01_patient.pid, field)
        assert withdrawn.to_er7() == sent, field
    assert "NEW-0815" not in withdrawal.to_er7() and "Corrected" not in withdrawal.to_er7()
    [first, second] = [_report(b)["subject"] for _m, _p, b in fhir_server[1].received]
    assert second == first


def test_a_redraft_cancels_the_earlier_drafts_unsent_objects_to_its_destinations(
    db_url: str,
    tmp_path: Path,
    demo_bundle: Path,
    model_host: ModelHost,
    scp: Scp,
    hl7_listener: tuple[int, Receiver],
) -> None:
    """A late instance has the study drafted again, and the new job's routing rule sends to
    the PACS only: job 1's objects not yet sent there are cancelled (the one being sent loses
    its claim), so the PACS never gets the older draft after the newer; the RIS, which job 2
    does not send to, still gets job 1's ORU. SQLite and PostgreSQL."""
    dimse = {
        "kind": "dimse",
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": scp.port,
        "objects": ["sr", "basic-sr", "pdf"],
    }
    hl7 = {
        "kind": "hl7",
        "host": "127.0.0.1",
        "port": hl7_listener[0],
        "receiving_application": "RIS",
    }
    env = make_env(
        db_url,
        tmp_path,
        demo_bundle,
        destinations=json.dumps([dimse, hl7]),
    )
    try:
        pacs, ris = (str(d) for d in env.settings.destinations)
        study = env.add_study(view="PA")
        [job1] = env.queue_all()
        claim(env)
        [first] = run_batch(env.deps, [job1], model_host, owner=OWNER)
        assert first.status == "done", first.error
        # the PACS took the SR, then went down; the RIS was down; a withdrawal had failed
        with env.session_factory() as s:
            deliveries_db.enqueue_deliveries(
                s, job_id=job1, items=[Outbound(pacs, DeliveryObject.withdrawal, "gone.dcm")]
            )
            claimed = {(c.destination, c.object): c for c in deliveries_db.claim_due_deliveries(s)}
            sr, basic, pdf, withdrawal, report = (
                claimed[pacs, DeliveryObject.sr],
                claimed[pacs, DeliveryObject.basic_sr],
                claimed[pacs, DeliveryObject.pdf],
                claimed[pacs, DeliveryObject.withdrawal],
                claimed[ris, DeliveryObject.report],
            )
            assert deliveries_db.mark_sent(s, sr.id, claimed_until=sr.next_attempt_at)
            assert deliveries_db.mark_failed(
                s, withdrawal.id, error="x", claimed_until=withdrawal.next_attempt_at
            )
            for due in (basic, report):
                assert deliveries_db.release_claim(s, due.id, claimed_until=due.next_attempt_at)
            # pdf stays claimed: a sender is sending it when job 2 completes
        env.add_study(study_uid=study, view="AP")
        [job2] = env.queue_all()
        with env.session_factory() as s:
            s.get_one(Job, job2).destinations = [pacs]  # its routing rule's choice
            s.commit()
        assert claim(env) == job2
        [again] = run_batch(env.deps, [job2], model_host, owner=OWNER)
        assert again.status == "done", again.error

        rows = {r.id: r for r in env.deliveries(job1)}
        for cancelled, kept in ((basic, None), (pdf, pdf.next_attempt_at)):
            row = rows[cancelled.id]
            assert row.state is DeliveryState.cancelled and row.next_attempt_at == kept
            assert row.last_error == f"cancelled: superseded by job {job2} before it was sent"
        assert rows[sr.id].state is DeliveryState.sent
        assert rows[withdrawal.id].state is DeliveryState.failed
        assert rows[report.id].state is DeliveryState.pending  # job 2 does not go to the RIS
        newer = env.deliveries(job2)
        assert sorted(r.object.value for r in newer) == ["basic-sr", "pdf", "sr"]
        assert {(r.destination, r.state) for r in newer} == {(pacs, DeliveryState.pending)}
        with env.session_factory() as s:
            [entry] = s.scalars(select(AuditLog).where(AuditLog.action == "delivery.supersede"))
        assert (entry.actor, entry.target) == ("system", f"job:{job2}")
        assert entry.detail == {"cancelled": [basic.id, pdf.id], "jobs": [job1]}

        # job 2's objects do not overtake job 1's PDF on its way to the PACS
        _send_all(env)
        assert {r.state for r in env.deliveries(job2)} == {DeliveryState.pending}
        assert scp.by_class(ComprehensiveSRStorage) == []
        # the send in flight ends: the sender records nothing and goes on
        in_flight = DeliveryComponent(env.context()).deliver(pdf)
        assert in_flight.state == "lost"
        assert {r.id: r.state for r in env.deliveries(job1)}[pdf.id] is DeliveryState.cancelled
        _send_all(env)
        assert {r.state for r in env.deliveries(job2)} == {DeliveryState.sent}
        # the PACS got job 2's objects and job 1's PDF that was on its way; never job 1's
        # Basic Text SR, which was waiting
        [basic_ds] = scp.by_class(BasicTextSRStorage)
        assert basic_ds.SOPInstanceUID == next(
            r.object_uid for r in newer if r.object is DeliveryObject.basic_sr
        )
        assert [ds.SOPInstanceUID for ds in scp.by_class(ComprehensiveSRStorage)] == [again.sr_uid]
        assert len(scp.by_class(EncapsulatedPDFStorage)) == 2
        assert len(hl7_listener[1].received) == 1  # the RIS keeps job 1's draft
    finally:
        env.engine.dispose()


def test_a_resend_of_a_superseded_draft_leaves_the_destinations_the_newer_one_went_to(
    db_url: str,
    tmp_path: Path,
    demo_bundle: Path,
    model_host: ModelHost,
    hl7_listener: tuple[int, Receiver],
) -> None:
    """Job 1's ORU^R01 went to the RIS, then a late instance had the study drafted again and
    job 2's ORU went there too. An admin re-send of job 1 (the job, or its row) must not send
    the older draft after the newer one: an ORU^R01 for the same order overwrites the newer
    preliminary result in the RIS, what superseding prevents for rows not yet sent. Job 2's
    own re-send still goes. SQLite and PostgreSQL."""
    hl7 = {
        "kind": "hl7",
        "host": "127.0.0.1",
        "port": hl7_listener[0],
        "receiving_application": "RIS",
    }
    env = make_env(db_url, tmp_path, demo_bundle, destinations=json.dumps([hl7]))
    received = hl7_listener[1].received
    try:
        first, again = _draft_twice(env, model_host)
        job1, job2 = first.job_id, again.job_id
        [old], [new] = env.deliveries(job1), env.deliveries(job2)
        assert (old.state, new.state) == (DeliveryState.sent, DeliveryState.sent)
        assert [m.msh.msh_10.to_er7() for m in received] == [old.object_uid, new.object_uid]

        with env.session_factory() as s:
            assert deliveries_db.resend(s, job1, actor="admin") == []
            assert deliveries_db.resend_deliveries(s, actor="admin", ids=[old.id]) == []
        assert env.deliveries(job1)[0].state is DeliveryState.sent
        _send_all(env)
        assert [m.msh.msh_10.to_er7() for m in received] == [old.object_uid, new.object_uid]

        with env.session_factory() as s:
            assert deliveries_db.resend(s, job2, actor="admin") == [new.id]
        _send_all(env)
        assert received[-1].msh.msh_10.to_er7() == new.object_uid and len(received) == 3
    finally:
        env.engine.dispose()


@pytest.mark.parametrize("offset", ["-0400", None])
def test_a_withdrawal_built_from_the_sr_dates_the_study_as_the_draft_did(
    out_env: NodeEnv,
    model_host: ModelHost,
    hl7_listener: tuple[int, Receiver],
    fhir_server: tuple[str, FhirReceiver],
    offset: str | None,
) -> None:
    """With the image read gone, the withdrawal is built from the draft SR, and must date the
    study as the draft did (OBR-7, effectiveDateTime). For an image without Timezone Offset
    From UTC the SR stated "+0000", declaring the study's local times UTC, and the withdrawal
    carried that offset where the draft had none."""
    env = out_env
    source = _ordered_cxr(env, generate_uid())
    ds = pydicom.dcmread(source)
    if offset is None:
        del ds.TimezoneOffsetFromUTC
    else:
        ds.TimezoneOffsetFromUTC = offset
    ds.save_as(source, enforce_file_format=True)
    job_id = _draft_and_send(env, model_host, source).job_id
    _withdraw_without_the_image(env, job_id)
    draft, withdrawal = hl7_listener[1].received
    dates = [
        m.oru_r01_patient_result.oru_r01_order_observation.obr.obr_7.to_er7()
        for m in (draft, withdrawal)
    ]
    assert dates[0] == f"20040826185059{offset or ''}" == dates[1]
    [sent, withdrawn] = [
        _report(b).get("effectiveDateTime") for _m, _p, b in fhir_server[1].received
    ]
    assert withdrawn == sent


def _draft_twice(env: NodeEnv, model_host: ModelHost) -> tuple[JobOutcome, JobOutcome]:
    """A PA study drafted and sent, then a late AP instance and the study drafted again from
    both (a new SR) and sent; both outcomes."""
    study = env.add_study(view="PA")
    one = _draft_received(env, model_host)
    env.add_study(study_uid=study, view="AP")  # the late instance
    two = _draft_received(env, model_host)
    assert one.sr_uid != two.sr_uid
    return one, two


def test_withdrawing_a_superseded_draft_leaves_the_newer_result_for_the_order(
    out_env: NodeEnv,
    model_host: ModelHost,
    scp: Scp,
    hl7_listener: tuple[int, Receiver],
    fhir_server: tuple[str, FhirReceiver],
) -> None:
    """Job 2, drafted after a late instance, went everywhere job 1 went; then job 1's draft
    is withdrawn. Its own objects are withdrawn in the PACS (rejection note) and the FHIR
    server (its DiagnosticReport), but no ORU goes to the RIS: HL7 v2 results are the
    order's, job 2's ORU^R01 replaced job 1's, and OBX-11 "W" for the order would mark job
    2's newer result wrong (HL7 v2.5.1 section 7.4.1)."""
    env = out_env
    one, two = _draft_twice(env, model_host)

    result = withdraw(
        env.settings, env.session_factory, one.job_id, actor="test:op", reason="superseded"
    )
    [hl7] = [d for d in env.settings.destinations if isinstance(d, Hl7Destination)]
    assert list(result.skipped) == [str(hl7)]
    assert f"job {two.job_id}'s later draft" in result.skipped[str(hl7)]
    assert result.superseded == [] and env.job(two.job_id).withdrawn_at is None
    _send_all(env)
    assert _result_statuses(hl7_listener[1]) == ["R", "R"]
    [kos] = scp.by_class(KeyObjectSelectionDocumentStorage)
    assert one.sr_uid in _rejected(kos) and two.sr_uid not in _rejected(kos)
    withdrawn = [b for _m, _p, b in fhir_server[1].received if _draft_report(b) is None]
    assert len(withdrawn) == 1 and two.sr_uid not in json.dumps(withdrawn[0])
    assert one.sr_uid in json.dumps(withdrawn[0])


@pytest.mark.parametrize("refused", [True, False])
def test_a_withdrawal_a_later_result_holds_back_goes_to_the_ris_if_it_refuses_that_result(
    out_env: NodeEnv,
    model_host: ModelHost,
    hl7_listener: tuple[int, Receiver],
    refused: bool,
) -> None:
    """Job 1's draft reached the RIS; job 2, drafted after a late instance, is done but
    nothing of it is sent yet when job 1 is withdrawn. Job 1's withdrawal to the RIS is
    built and held back: sent after job 2's ORU^R01, OBX-11 "W" for the order would mark
    the newer result wrong (HL7 v2.5.1 section 7.4.1). The RIS accepts job 2's result, and
    job 1's withdrawal stays back; or it refuses it for good (AE, ERR-3 100: the same
    message fails again), so job 1's withdrawn result is still the order's there, and the
    withdrawal goes out."""
    env, receiver = out_env, hl7_listener[1]
    study = env.add_study(view="PA")
    one = _draft_received(env, model_host)
    env.add_study(study_uid=study, view="AP")  # the late instance
    [job2] = env.queue_all()
    assert claim(env) == job2
    [two] = run_batch(env.deps, [job2], model_host, owner=OWNER)
    assert two.status == "done", two.error

    result = withdraw(env.settings, env.session_factory, one.job_id, actor="test:op", reason="x")
    [hl7] = [d for d in env.settings.destinations if isinstance(d, Hl7Destination)]
    assert result.held == {str(hl7): job2} and result.skipped == {}
    assert len(result.queued) == 2  # the rejection note and the FHIR withdrawal
    if refused:
        receiver.mode, receiver.err_code = "AE", "100"
    DeliveryComponent(env.context(), max_parallel=8).run_once()  # job 2's, job 1's two
    receiver.mode = "AA"
    _send_all(env)
    assert _result_statuses(receiver) == ["R", "R", "C"] if refused else ["R", "R"]
    if refused:  # job 1's withdrawal
        withdrawn = message_control_id(one.sr_uid, "withdraw", str(hl7))
        assert receiver.received[2].msh.msh_10.to_er7() == withdrawn


def test_withdrawing_the_current_draft_withdraws_the_drafts_it_superseded(
    out_env: NodeEnv,
    model_host: ModelHost,
    scp: Scp,
    hl7_listener: tuple[int, Receiver],
    fhir_server: tuple[str, FhirReceiver],
) -> None:
    """Job 2, drafted after a late instance, superseded job 1 everywhere; then job 2's draft
    is withdrawn. Job 1's goes with it: else the draft of fewer instances would be the
    study's current one again, reviewed and scored at the node and the visible AI draft in
    the PACS (its SR no longer behind a newer one) and the EHR (its DiagnosticReport no
    longer replaced). Each draft's objects get their own rejection note and their own
    DiagnosticReport ``entered-in-error``; the RIS gets one ORU, job 2's, since HL7 v2
    results are the order's and job 2's replaced job 1's there."""
    env = out_env
    one, two = _draft_twice(env, model_host)

    result = withdraw(env.settings, env.session_factory, two.job_id, actor="test:op", reason="x")
    [hl7] = [d for d in env.settings.destinations if isinstance(d, Hl7Destination)]
    assert result.skipped == {} and len(result.queued) == 3
    [earlier] = result.superseded
    assert earlier.job_id == one.job_id and len(earlier.queued) == 2
    assert list(earlier.skipped) == [str(hl7)]
    assert f"job {two.job_id}'s withdrawal goes there" in earlier.skipped[str(hl7)]
    assert env.job(one.job_id).withdrawn_at is not None
    assert env.job(one.job_id).withdrawn_reason == "x"
    _send_all(env)
    notes = [_rejected(kos) for kos in scp.by_class(KeyObjectSelectionDocumentStorage)]
    assert sorted(one.sr_uid in n for n in notes) == [False, True]
    assert all((one.sr_uid in n) != (two.sr_uid in n) for n in notes)
    assert _result_statuses(hl7_listener[1]) == ["R", "R", "C"]
    withdrawn = [_report(b) for _m, _p, b in fhir_server[1].received if _draft_report(b) is None]
    assert sorted(r["identifier"][0]["value"] for r in withdrawn) == sorted(
        f"urn:oid:{uid}" for uid in (one.sr_uid, two.sr_uid)
    )
    assert {r["status"] for r in withdrawn} == {"entered-in-error"}
    with env.session_factory() as s:
        study = s.get_one(Job, one.job_id).study.study_instance_uid
        assert draft_for(s, study, None) is None
        entries = {
            e.target: e.detail
            for e in s.scalars(select(AuditLog).where(AuditLog.action == "job.withdraw"))
        }
    assert entries[f"job:{two.job_id}"]["superseded"] == [one.job_id]
    assert entries[f"job:{one.job_id}"]["with_job"] == two.job_id


def test_an_earlier_draft_withdrawn_with_one_never_sent_withdraws_its_own_result(
    out_env: NodeEnv, model_host: ModelHost, hl7_listener: tuple[int, Receiver]
) -> None:
    """Three drafts of a study, each after a late instance; job 3's is withdrawn before
    anything of it was sent, and jobs 2 and 1 go with it, newest first. Job 3's ORU^R01
    never reached the RIS and replaced nothing there, so job 2's result is still the
    order's: job 2's withdrawal, not skipped for job 3's cancelled row, marks it wrong, and
    job 1's is skipped, job 2's having replaced it there."""
    env = out_env
    one, two = _draft_twice(env, model_host)
    with env.session_factory() as s:
        study = s.get_one(Job, one.job_id).study.study_instance_uid
    env.add_study(study_uid=study, view="PA")  # a third instance, later still
    [job3] = env.queue_all()
    assert claim(env) == job3
    [three] = run_batch(env.deps, [job3], model_host, owner=OWNER)
    assert three.status == "done", three.error

    result = withdraw(env.settings, env.session_factory, job3, actor="test:op", reason="x")
    assert result.queued == [] and len(result.cancelled) == 5
    assert [w.job_id for w in result.superseded] == [two.job_id, one.job_id]
    middle, earliest = result.superseded
    assert middle.skipped == {} and len(middle.queued) == 3
    [hl7] = [d for d in env.settings.destinations if isinstance(d, Hl7Destination)]
    assert list(earliest.skipped) == [str(hl7)] and len(earliest.queued) == 2
    assert f"job {two.job_id}'s withdrawal goes there" in earliest.skipped[str(hl7)]
    _send_all(env)
    assert _result_statuses(hl7_listener[1]) == ["R", "R", "C"]


@pytest.mark.parametrize("which", [0, 1])
def test_jobs_that_share_one_draft_are_withdrawn_together(
    out_env: NodeEnv,
    model_host: ModelHost,
    scp: Scp,
    hl7_listener: tuple[int, Receiver],
    which: int,
) -> None:
    """The image is sent again corrected before any withdrawal: job 2 drafts the same text
    from the same instances, so its draft is job 1's SR, held once by each receiver.
    Withdrawing either job withdraws that object, and with it both jobs: neither may stay
    the study's current draft (reviewable, scored against finals) while its object is
    withdrawn everywhere. Each receiver gets one withdrawal; the RIS's is not skipped as if
    the other job were a later, different draft."""
    env = out_env
    study = generate_uid()
    source = _ordered_cxr(env, study)
    one = _draft_and_send(env, model_host, source)
    _send_corrected(env, source, PatientName="Corrected^Name")
    two = _draft_received(env, model_host)
    assert two.sr_uid == one.sr_uid
    jobs = [one.job_id, two.job_id]

    result = withdraw(env.settings, env.session_factory, jobs[which], actor="test:op", reason="x")
    assert result.same_draft == [jobs[1 - which]] and result.skipped == {}
    assert all(env.job(j).withdrawn_at is not None for j in jobs)
    _send_all(env)
    assert len(scp.by_class(KeyObjectSelectionDocumentStorage)) == 1
    assert _result_statuses(hl7_listener[1]).count("C") == 1
    with env.session_factory() as s:
        assert draft_for(s, study, None) is None
        [entry] = s.scalars(select(AuditLog).where(AuditLog.action == "job.withdraw"))
        assert entry.detail["same_draft"] == [jobs[1 - which]]


def test_a_redrafts_fhir_report_names_the_report_it_replaces(
    out_env: NodeEnv, model_host: ModelHost, fhir_server: tuple[str, FhirReceiver]
) -> None:
    """A late instance has the study drafted again: the FHIR server gets a second partial
    DiagnosticReport, which names the first as the one it replaces (the core R4 extension
    ``diagnosticReport-replaces``, by identifier), so that the EHR can tell the current AI
    draft from the superseded one. The first draft names none."""
    env = out_env
    one, _two = _draft_twice(env, model_host)
    assert fhir_server[1].problems == []
    first, second = [_report(b) for _m, _p, b in fhir_server[1].received]
    assert "extension" not in first
    [replaces] = second["extension"]
    assert replaces["url"] == "http://hl7.org/fhir/StructureDefinition/diagnosticReport-replaces"
    assert replaces["valueReference"]["identifier"] == first["identifier"][0]
    assert first["identifier"][0]["value"] == f"urn:oid:{one.sr_uid}"
