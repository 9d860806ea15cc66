"""Final reports come back and are scored against the draft (issue #25).

Real peers throughout: the node's MLLP listener with the node's own MLLP client
(``integration.mllp.send_mllp``) and a raw socket; the node's storage SCP with DCMTK
``storescu`` sending a radiologist's VERIFIED SR built with highdicom; SQLite and
PostgreSQL. Drafts are seeded as rows (the model is not what is tested here).
"""

from __future__ import annotations

import csv
import io
import subprocess
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from integration.encapsulated_pdf import build_encapsulated_pdf
from integration.final_report import final_report_from_oru
from integration.mllp import send_mllp
from node.db import finals as finals_db
from node.db.conversations import ConversationRecord
from node.db.models import AuditLog, FinalReport, Instance, Job, JobState
from node.db.retention import purge_expired_studies
from node.metrics import QualitySettings, render
from node.runtime.finals import FinalIntake, make_hl7_listener
from node.runtime.service import NodeContext, _build_scp
from node.services import chat, quality
from node.services.context import ServiceContext
from node.services.errors import InvalidInput
from node.settings import Settings, load_settings
from tests.helpers import free_port, require_binary, rg1_file
from tests.node.factories import T0, add_redraft, seed_draft
from tests.reporting.final_builders import STUDY_UID, final_sr, oru

DRAFT_NO_PTX = "FINDINGS: No pneumothorax. Heart size normal.\nIMPRESSION: No acute disease."
FINAL_PTX = "FINDINGS: Large right pneumothorax.\nIMPRESSION: Right pneumothorax."


@pytest.fixture
def source() -> Dataset:
    """The image the final report is about (a real CR, RG1_UNCR)."""
    return pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))


def _settings(tmp_path: Path, db_url: str, **kw: object) -> Settings:
    return load_settings(
        None,
        database_url=db_url,
        spool_dir=tmp_path / "spool",
        **kw,
    )


def _finals(factory: sessionmaker[Session]) -> list[FinalReport]:
    with factory() as s:
        return list(s.scalars(select(FinalReport).order_by(FinalReport.id)))


def test_hl7_final_is_matched_and_scored(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str
) -> None:
    job = seed_draft(session_factory, STUDY_UID, DRAFT_NO_PTX)
    intake = FinalIntake(_settings(tmp_path, db_url), session_factory)
    message = oru(observations=[("TX", "59776-5^Findings^LN", "Large right pneumothorax.")])
    outcome = intake.receive(final_report_from_oru(message), sender="10.0.0.5")
    assert outcome.new and outcome.matched and outcome.significant
    [row] = _finals(session_factory)
    assert row.job_id == job and row.source.value == "hl7" and row.verified
    assert row.final_labels["pneumothorax"] == "positive"
    assert row.draft_labels["pneumothorax"] == "negative"
    assert row.discrepancies == [
        {
            "observation": "pneumothorax",
            "direction": "missed",
            "draft": "negative",
            "final": "positive",
        }
    ]
    assert 0 <= row.agreement < 1 and row.bleu4 is not None and row.rouge_l is not None
    # the same message again is the same row
    again = intake.receive(final_report_from_oru(message), sender="10.0.0.5")
    assert again.final_id == outcome.final_id and not again.new
    assert len(_finals(session_factory)) == 1


def test_final_before_draft_is_matched_later_by_accession(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str
) -> None:
    intake = FinalIntake(_settings(tmp_path, db_url), session_factory)
    report = final_report_from_oru(oru(zds=False, accession="ACC-77", control="RIS-0002"))
    assert report.study_uid is None and report.accession_number == "ACC-77"
    first = intake.receive(report, sender="ris")
    assert first.new and not first.matched
    assert intake.match_pending() == 0
    job = seed_draft(session_factory, "1.2.3.4.77", DRAFT_NO_PTX, accession="ACC-77")
    assert intake.match_pending() == 1
    [row] = _finals(session_factory)
    assert row.job_id == job and row.agreement is not None and not row.significant
    assert intake.match_pending() == 0


def test_quality_summary_export_and_alert(
    session_factory: sessionmaker[Session], engine: Engine, tmp_path: Path, db_url: str
) -> None:
    settings = _settings(
        tmp_path, db_url, agreement_min_pairs=3, agreement_window=4, agreement_alert_threshold=0.9
    )
    intake = FinalIntake(settings, session_factory)
    for k in range(4):
        uid = f"1.2.3.5.{k}"
        seed_draft(session_factory, uid, DRAFT_NO_PTX, version="v2" if k % 2 else "v1")
        text = FINAL_PTX if k < 3 else DRAFT_NO_PTX
        report = final_report_from_oru(oru(control=f"RIS-1{k}", zds=False, accession=f"A{k}"))
        intake.receive(replace(report, study_uid=uid, text=text), sender="ris")
    assert intake.check_alert() is True
    ctx = ServiceContext(settings, session_factory, session_factory)
    data = quality.summary(ctx)
    assert data["overall"]["pairs"] == 4
    ptx = data["overall"]["observations"]["pneumothorax"]
    # hand-computed: 3 pairs disagree (negative vs positive), 1 agrees
    assert ptx["agreement"] == pytest.approx(0.25)
    assert ptx["missed"] == 3 and ptx["overcalled"] == 0
    assert data["overall"]["significant_discrepancies"] == 3
    assert set(data["by_model_version"]) == {"v1", "v2"}
    assert data["alert"]["active"] is True and len(data["discrepancies"]) == 3
    rows = list(csv.DictReader(io.StringIO(quality.export_csv(quality.export_rows(ctx)))))
    assert len(rows) == 4 and rows[0]["final_pneumothorax"] == "positive"
    assert "full_text" not in rows[0] and "Large right" not in quality.export_csv(
        quality.export_rows(ctx)
    )
    text = render(session_factory, QualitySettings(4, 0.9, 3)).decode()
    assert "cxr_agreement_alert 1.0" in text and "cxr_rolling_pairs 4.0" in text


def test_retention_purges_finals(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str
) -> None:
    intake = FinalIntake(_settings(tmp_path, db_url), session_factory)
    seed_draft(session_factory, STUDY_UID, DRAFT_NO_PTX)
    intake.receive(final_report_from_oru(oru()), sender="ris")
    intake.receive(
        final_report_from_oru(oru(zds=False, accession="X9", control="C2")), sender="ris"
    )
    assert len(_finals(session_factory)) == 2
    with session_factory() as s:
        purge_expired_studies(s, older_than=datetime.now(UTC) + timedelta(days=1))
    assert _finals(session_factory) == []


@pytest.fixture
def hl7_node(
    session_factory: sessionmaker[Session], engine: Engine, tmp_path: Path, db_url: str
) -> tuple[int, sessionmaker[Session]]:
    port = free_port()
    settings = _settings(
        tmp_path, db_url, hl7_listen=f"127.0.0.1:{port}", hl7_allowed_hosts="127.0.0.1"
    )
    ctx = NodeContext(settings, engine, session_factory, "test", threading.Event())
    listener = make_hl7_listener(ctx)
    listener.start()
    yield listener.port, session_factory
    listener.stop()


def test_hl7_listener_acks_and_stores(hl7_node: tuple[int, sessionmaker[Session]]) -> None:
    port, factory = hl7_node
    job = seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    ack = send_mllp(oru(), "127.0.0.1", port).decode()
    assert "MSA|AA|RIS-0001" in ack
    [row] = _finals(factory)
    assert row.job_id == job and row.sender == "127.0.0.1"
    # a preliminary result is refused with a reason and nothing is stored
    nack = send_mllp(oru(status="P", control="RIS-0003"), "127.0.0.1", port).decode()
    assert "MSA|AE|RIS-0003" in nack and "ERR|" in nack
    assert len(_finals(factory)) == 1


def test_verified_sr_over_dicom_is_a_final_report(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str, source: Dataset
) -> None:
    storescu = require_binary("storescu")
    settings = _settings(tmp_path, db_url, ae_title="CXRNODE")
    settings.prepare_runtime()
    job = seed_draft(session_factory, str(source.StudyInstanceUID), DRAFT_NO_PTX)
    ae, handlers = _build_scp(settings, session_factory)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        verified, unverified = final_sr(source), final_sr(source, verified=False)
        broken = final_sr(source)
        del broken.StudyInstanceUID
        for name, ds in (("v", verified), ("u", unverified), ("b", broken)):
            ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)

        def send(name: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    storescu,
                    "-d",  # the response's Status in hex (-v names it only)
                    "-aec",
                    "CXRNODE",
                    "-aet",
                    "RIS",
                    "127.0.0.1",
                    str(port),
                    str(tmp_path / f"{name}.dcm"),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )

        assert send("v").returncode == 0
        [row] = _finals(session_factory)
        assert row.source.value == "dicom-sr" and row.job_id == job and row.sender == "RIS"
        assert row.object_uid == verified.SOPInstanceUID and row.agreement is not None
        # an unverified SR from a sender that is not a report source: ingested as before
        assert send("u").returncode == 0
        with session_factory() as s:
            assert (
                s.scalar(
                    select(func.count(Instance.id)).where(
                        Instance.sop_instance_uid == unverified.SOPInstanceUID
                    )
                )
                == 1
            )
        # a verified SR without a Study Instance UID: refused as any instance (0xA901),
        # nothing stored
        refused = send("b")
        assert "0XA901" in (refused.stdout + refused.stderr).upper()
        assert len(_finals(session_factory)) == 1
    finally:
        server.shutdown()


def test_review_at_the_node(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str
) -> None:
    from node.db import tokens as tokens_db
    from node.services import review
    from node.services.errors import Conflict, InvalidInput

    settings = _settings(tmp_path, db_url)
    ctx = ServiceContext(settings, session_factory, session_factory)
    with session_factory() as s:  # the role exists in the schema (CHECK constraint)
        row = tokens_db.create_token(
            s, name="rad", role="reviewer", token_hash="0" * 64, actor="test"
        )
    assert row.role == "reviewer"
    job = seed_draft(session_factory, STUDY_UID, DRAFT_NO_PTX)
    accepted = review.review(ctx, job, review.Decision.accept, actor="token:1:rad")
    assert accepted.agreement == 1.0 and not accepted.significant
    edited = review.review(ctx, job, review.Decision.edit, actor="token:1:rad", text=FINAL_PTX)
    assert edited.significant and edited.agreement is not None and edited.agreement < 1
    with pytest.raises(InvalidInput):
        review.review(ctx, job, review.Decision.reject, actor="token:1:rad", reason=" ")
    rejected = review.review(
        ctx, job, review.Decision.reject, actor="token:1:rad", reason="wrong side"
    )
    assert rejected.agreement is None
    rows = _finals(session_factory)
    assert [r.review_decision for r in rows] == ["accept", "edit", "reject"]
    assert rows[2].full_text == "" and rows[2].review_reason == "wrong side"
    assert all(r.job_id == job for r in rows)
    # the rejection is not a scored pair; of the accept and the edit of the one draft the
    # latest counts: one pair, the edit's
    assert quality.summary(ctx)["overall"]["pairs"] == 1
    assert [r["final_id"] for r in quality.export_rows(ctx)] == [rows[1].id]
    with session_factory() as s:
        actions = [a.action for a in s.scalars(select(AuditLog).order_by(AuditLog.id))]
    assert actions.count("draft.review") == 3
    other = seed_draft(session_factory, "1.2.3.6", DRAFT_NO_PTX)
    with session_factory() as s:
        j = s.get(Job, other)
        assert j is not None
        j.withdrawn_at = datetime.now(UTC)
        s.commit()
    with pytest.raises(Conflict):
        review.review(ctx, other, review.Decision.accept, actor="token:1:rad")


_REFUSE_REVIEW_AUDIT = {
    # the database itself refuses the draft.review audit row (no mock: the real INSERT fails)
    "sqlite": [
        "CREATE TRIGGER refuse_review BEFORE INSERT ON audit_log "
        "WHEN NEW.action = 'draft.review' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_review() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused'; END $$",
        "CREATE TRIGGER refuse_review BEFORE INSERT ON audit_log FOR EACH ROW "
        "WHEN (NEW.action = 'draft.review') EXECUTE FUNCTION refuse_review()",
    ],
}


def test_a_review_and_its_audit_rows_are_one_transaction(
    session_factory: sessionmaker[Session], engine: Engine
) -> None:
    from node.db import finals as finals_db
    from node.db.models import FinalSource

    job = seed_draft(session_factory, STUDY_UID, DRAFT_NO_PTX)
    now = datetime.now(UTC)
    final = finals_db.FinalIn(
        source=FinalSource.review,
        object_uid=f"review:{job}:{now.isoformat()}",
        sender="token:1:rad",
        study_uid=STUDY_UID,
        accession_number=None,
        verified=True,
        full_text=DRAFT_NO_PTX,
        findings=None,
        impression=None,
        signed_at=now,
        review_decision="accept",
        job_id=job,
    )
    with session_factory() as s:
        for wrong in (
            replace(final, source=FinalSource.hl7),  # a received report is not a review
            replace(final, job_id=None),  # a review is of a job's draft
        ):
            with pytest.raises(ValueError, match="review of a job"):
                finals_db.record_review(s, wrong, actor="token:1:rad")
        final_id = finals_db.record_review(s, final, actor="token:1:rad")
    assert [r.id for r in _finals(session_factory)] == [final_id]
    with session_factory() as s:
        rows = list(s.scalars(select(AuditLog).order_by(AuditLog.id)))
    reviewed = [
        (a.action, a.target, a.detail) for a in rows if a.action.startswith(("final", "draft"))
    ]
    assert reviewed == [
        (
            "final.receive",
            f"study:{STUDY_UID}",
            {"final": final_id, "source": "review", "verified": True},
        ),
        ("draft.review", f"job:{job}", {"decision": "accept", "final": final_id}),
    ]
    # when the draft.review row cannot be written, the review is not stored either
    with engine.begin() as conn:
        for statement in _REFUSE_REVIEW_AUDIT[engine.dialect.name]:
            conn.exec_driver_sql(statement)
    with session_factory() as s, pytest.raises(DBAPIError, match="refused"):
        finals_db.record_review(
            s, replace(final, object_uid=f"{final.object_uid}:again"), actor="token:1:rad"
        )
    assert [r.id for r in _finals(session_factory)] == [final_id]


def test_serve_runs_the_listener_only_when_configured(tmp_path: Path, db_url: str) -> None:
    from node.runtime.components import default_components

    off = _settings(tmp_path, db_url)
    on = _settings(tmp_path, db_url, hl7_listen="127.0.0.1:2575")
    assert make_hl7_listener not in default_components(off, worker=False, api=False)
    assert make_hl7_listener in default_components(on, worker=False, api=False)
    with pytest.raises(ValueError, match="hl7_allowed_hosts"):
        _settings(tmp_path, db_url, hl7_listen="0.0.0.0:2575")


def test_a_withdrawn_draft_is_not_the_study_draft_a_summary_uses(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str
) -> None:
    """A summary without a report uses the study's draft (``/summary``, ``POST
    .../summary``): never a withdrawn one (it must not be used), but the newest draft not
    withdrawn, the one a final report is matched to; a withdrawn job's draft is refused by
    job id too."""
    ctx = ServiceContext(_settings(tmp_path, db_url), session_factory, session_factory)
    first = seed_draft(session_factory, STUDY_UID, DRAFT_NO_PTX)
    with session_factory() as s:  # a late instance: the study drafted again, later
        later = add_redraft(
            s, first, FINAL_PTX, at=T0 + timedelta(hours=1), sr_sop_instance_uid=f"{STUDY_UID}.10"
        )
        s.commit()
        second = later.id
    assert chat.study_draft(ctx, STUDY_UID) == FINAL_PTX
    with session_factory() as s:  # the later draft is withdrawn (wrong side)
        s.get_one(Job, second).withdrawn_at = datetime.now(UTC)
        s.commit()
    with session_factory() as s:
        match = finals_db.draft_for(s, STUDY_UID, None)
    assert match is not None and match.job_id == first
    assert chat.study_draft(ctx, STUDY_UID) == DRAFT_NO_PTX == match.text
    now = datetime.now(UTC)
    conv = ConversationRecord(
        id=1,
        created_at=now,
        updated_at=now,
        actor="test",
        study_uid=STUDY_UID,
        sop_instance_uid=None,
        source="study",
        image_codes=[],
        model_name="LLM-CXR-DEMO",
        model_version="v1",
        demo=True,
        turns=[],
    )
    assert chat.resolve_report(ctx, conv, job_id=None, report=None) == DRAFT_NO_PTX
    with pytest.raises(InvalidInput, match="withdrawn"):
        chat.resolve_report(ctx, conv, job_id=second, report=None)
    with session_factory() as s:  # both withdrawn: the study has no draft to summarize
        s.get_one(Job, first).withdrawn_at = datetime.now(UTC)
        s.commit()
    assert chat.study_draft(ctx, STUDY_UID) is None
    with pytest.raises(InvalidInput, match="no draft"):
        chat.resolve_report(ctx, conv, job_id=None, report=None)


@pytest.mark.parametrize("state", [JobState.failed, JobState.running])
def test_a_draft_of_a_job_not_done_is_not_the_study_draft_a_summary_uses(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str, state: JobState
) -> None:
    """A job stores its draft before it writes the SR and queues the objects; one that then
    failed (its objects could not be built) or is still on the way drafted nothing that went
    out. The study's draft a summary rewrites is the current one, the latest job's that is
    done and not withdrawn, as finals take it (docs/policies.md, "Superseded drafts"), not
    that job's."""
    ctx = ServiceContext(_settings(tmp_path, db_url), session_factory, session_factory)
    first = seed_draft(session_factory, STUDY_UID, DRAFT_NO_PTX)
    with session_factory() as s:  # a late instance: the later job stored its draft, then...
        later = add_redraft(
            s, first, FINAL_PTX, at=T0 + timedelta(hours=1), sr_sop_instance_uid=f"{STUDY_UID}.10"
        )
        later.state, later.sr_sop_instance_uid = state, None
        s.commit()
    with session_factory() as s:
        match = finals_db.draft_for(s, STUDY_UID, None)
    assert match is not None and match.job_id == first
    assert chat.study_draft(ctx, STUDY_UID) == DRAFT_NO_PTX == match.text


def test_a_corrected_final_replaces_the_earlier_one_in_the_statistics(
    hl7_node: tuple[int, sessionmaker[Session]], tmp_path: Path, db_url: str
) -> None:
    """HL7 table 0123: OBR-25 ``C`` is a correction that replaces the final result. The
    study's draft is one pair in the summary, the export and the rolling agreement, scored
    against the newest final; the job page still shows both reports."""
    port, factory = hl7_node
    ctx = ServiceContext(_settings(tmp_path, db_url), factory, factory)
    job = seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    final = oru(observations=[("TX", "59776-5^Findings^LN", "Large right pneumothorax.")])
    assert "MSA|AA|RIS-0001" in send_mllp(final, "127.0.0.1", port).decode()
    corrected = oru(
        status="C",
        control="RIS-0002",
        observations=[("TX", "59776-5^Findings^LN", "No pneumothorax. Heart size normal.")],
    )
    assert "MSA|AA|RIS-0002" in send_mllp(corrected, "127.0.0.1", port).decode()
    first, second = quality.job_finals(ctx, job)
    assert first.significant and not second.significant
    data = quality.summary(ctx)
    assert data["overall"]["pairs"] == 1
    assert data["overall"]["significant_discrepancies"] == 0 and data["discrepancies"] == []
    assert data["overall"]["observations"]["pneumothorax"]["agreement"] == 1.0
    assert [r["final_id"] for r in quality.export_rows(ctx)] == [second.id]
    assert quality.alert_state(ctx).pairs == 1
    assert quality.alert_state(ctx).rolling_agreement == second.agreement


def test_a_signing_time_out_of_range_is_unknown_not_an_error(
    hl7_node: tuple[int, sessionmaker[Session]],
) -> None:
    """``99991231...`` is a common "no date" value; with the sender's offset it is a time
    after 9999-12-31 in UTC, which no datetime holds. A time that cannot be read is unknown
    (``integration.final_report``), not an error: the report is stored and signed at the
    next time in line (MSH-7 here), not refused with AE 207, which a sender retries."""
    port, factory = hl7_node
    job = seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    ack = send_mllp(oru(report_time="99991231235959-0500"), "127.0.0.1", port).decode()
    assert "MSA|AA|RIS-0001" in ack
    [row] = _finals(factory)
    assert row.job_id == job and row.agreement is not None
    assert row.signed_at == datetime(2024, 5, 7, 7, 31, tzinfo=UTC)  # MSH-7, 09:31 at +0200


@pytest.mark.parametrize("processing", ["T", "D"])
def test_a_training_or_debugging_message_is_refused_not_scored(
    hl7_node: tuple[int, sessionmaker[Session]], tmp_path: Path, db_url: str, processing: str
) -> None:
    """MSH-11 (HL7 table 0103) ``T`` is a training message, ``D`` a debugging one: not the
    radiologist's final for a patient. HL7 v2.5.1 section 2.9.2.1 a): a processing ID the
    receiver does not take is rejected with MSA-1 ``AR`` (ERR-3 202, unsupported processing
    ID); the node takes production messages only, so nothing is stored or scored."""
    port, factory = hl7_node
    ctx = ServiceContext(_settings(tmp_path, db_url), factory, factory)
    seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    control = f"RIS-{processing}"
    message = oru(
        control=control,
        observations=[("TX", "59776-5^Findings^LN", "Large right pneumothorax.")],
    ).replace(f"|{control}|P|", f"|{control}|{processing}|", 1)
    ack = send_mllp(message, "127.0.0.1", port).decode()
    assert f"MSA|AR|{control}" in ack and "|202^" in ack
    assert _finals(factory) == []
    assert quality.summary(ctx)["overall"] is None
    # the production message is taken as before
    assert "MSA|AA|RIS-0001" in send_mllp(oru(), "127.0.0.1", port).decode()
    assert len(_finals(factory)) == 1


def test_two_senders_may_use_the_same_control_id(
    hl7_node: tuple[int, sessionmaker[Session]],
) -> None:
    """MSH-10 identifies a message of its sending application (MSH-3) and facility (MSH-4),
    not of every system: two reporting systems counting from 1 both send control ID 1001.
    Each one's final is stored and scored; only the same sender's message again is the same
    row (an ``AA`` for a final that is then dropped would lose it silently)."""
    port, factory = hl7_node
    chest = seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    other = seed_draft(factory, "1.2.826.0.1.3680043.8.498.88", DRAFT_NO_PTX, accession="ACC-88")
    first = oru(control="1001")
    second = oru(control="1001", zds=False, accession="ACC-88").replace(
        "MSH|^~\\&|RIS|RADIOLOGY|", "MSH|^~\\&|DICTATION|CLINIC-B|", 1
    )
    for message in (first, second, first):
        assert "MSA|AA|1001" in send_mllp(message, "127.0.0.1", port).decode()
    rows = _finals(factory)
    assert [r.job_id for r in rows] == [chest, other]
    assert all(r.agreement is not None for r in rows)


def test_another_orders_results_in_the_message_are_not_this_reports_text(
    hl7_node: tuple[int, sessionmaker[Session]],
) -> None:
    """An ORU^R01 may carry several orders (ORDER_OBSERVATION groups, v2.5.1 7.3.1): each
    OBR with its own status, study and OBX. The final report read is the first order's (its
    OBR-25, accession and study): the OBX of a later order, here another exam's preliminary
    result, are not its text, and scoring them would flag a discrepancy the radiologist's
    chest report does not have."""
    port, factory = hl7_node
    job = seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    chest = oru(observations=[("TX", "59776-5^Findings^LN", "No pneumothorax. Heart normal.")])
    ribs = "\r".join(
        [
            "ORC|RE",
            "OBR|2||FIL-2|36572-6^XR Ribs^LN||||||||||||||ACC-2||||20240507093000+0200||RAD|P",
            "OBX|1|TX|59776-5^Findings^LN|1|Right 6th rib fracture. Small pneumothorax.||||||P",
        ]
    )
    message = chest.rstrip("\r") + "\r" + ribs + "\r"
    assert "MSA|AA|RIS-0001" in send_mllp(message, "127.0.0.1", port).decode()
    [row] = _finals(factory)
    assert row.job_id == job and row.full_text == "No pneumothorax. Heart normal."
    assert not row.significant and row.final_labels["pneumothorax"] == "negative"


def test_a_nul_in_the_report_text_is_not_an_internal_error(
    hl7_node: tuple[int, sessionmaker[Session]],
) -> None:
    """A NUL (the hex escape ``\\X00\\`` of v2.5.1 2.7, or a legacy system's padding) is no
    text: it is left out, and the report is stored on PostgreSQL as on SQLite (PostgreSQL
    text cannot hold a NUL; it was AE 207, which a sender retries)."""
    port, factory = hl7_node
    job = seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    text = "No pneumothorax.@ Heart size normal.@@"  # hl7apy would escape the escapes
    message = oru(observations=[("TX", "59776-5^Findings^LN", text)])
    message = message.replace("normal.@@", "normal.\\X0000\\").replace(".@", ".\\X00\\")
    assert "MSA|AA|RIS-0001" in send_mllp(message, "127.0.0.1", port).decode()
    [row] = _finals(factory)
    assert row.job_id == job and row.full_text == "No pneumothorax. Heart size normal."


def test_a_nul_in_a_verified_srs_text_is_not_a_database_error(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str, source: Dataset
) -> None:
    """A NUL inside an SR's TEXT value (pydicom strips only trailing padding) is left out,
    as over HL7: stored (0x0000) on PostgreSQL as on SQLite, not answered 0xA7xx "database
    error", which a PACS sends again for ever."""
    storescu = require_binary("storescu")
    settings = _settings(tmp_path, db_url, ae_title="CXRNODE")
    settings.prepare_runtime()
    job = seed_draft(session_factory, str(source.StudyInstanceUID), DRAFT_NO_PTX)
    sr = final_sr(source)
    findings = sr.ContentSequence[-2].ContentSequence[0]
    findings.TextValue = "The lungs are clear.\x00 No pleural effusion."
    sr.save_as(tmp_path / "nul.dcm", enforce_file_format=True)
    sent = _storescu(storescu, settings, session_factory, tmp_path / "nul.dcm")
    assert sent.returncode == 0, sent.stderr
    [row] = _finals(session_factory)
    assert row.job_id == job and "\x00" not in row.full_text
    assert "The lungs are clear. No pleural effusion." in row.full_text


def _storescu(
    storescu: str, settings: Settings, factory: sessionmaker[Session], path: Path
) -> subprocess.CompletedProcess[str]:
    """Send ``path`` with DCMTK's storescu, as the RIS, to the node's SCP (started for it)."""
    ae, handlers = _build_scp(settings, factory)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        return subprocess.run(
            [storescu, "-aec", "CXRNODE", "-aet", "RIS", "127.0.0.1", str(port), path.name],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()


def _store_as_is(port: int, path: Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """C-STORE a Part 10 file's data set bytes exactly as they are (pynetdicom chunked
    send; the request's Affected SOP Instance UID is the file meta's), as the RIS."""
    from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="RIS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    return rsp


@pytest.mark.parametrize(
    ("defect", "status"),
    [("truncated", 0xC210), ("other-instance-uid", 0xA903), ("invalid-study-uid", 0xA901)],
)
def test_a_malformed_verified_sr_is_refused_as_any_instance(
    session_factory: sessionmaker[Session],
    tmp_path: Path,
    db_url: str,
    source: Dataset,
    monkeypatch: pytest.MonkeyPatch,
    defect: str,
    status: int,
) -> None:
    """A final report is refused with the status ``CONFORMANCE.md`` gives any instance
    (C-STORE response statuses): a truncated data set 0xC210, a data set that is not the
    instance the request names 0xA903 (PS3.4 B.2.3), an invalid Study Instance UID 0xA901;
    none is stored as a final report."""
    from pydicom.uid import generate_uid

    settings = _settings(tmp_path, db_url, ae_title="CXRNODE")
    settings.prepare_runtime()
    ae, handlers = _build_scp(settings, session_factory)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        sr = final_sr(source)
        path = tmp_path / "final.dcm"
        if defect == "truncated":
            sr.save_as(path, enforce_file_format=True)
            path.write_bytes(path.read_bytes()[:-7])  # ends inside the last value
        elif defect == "other-instance-uid":
            sr.save_as(path, enforce_file_format=True)
            sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request's
            sr.save_as(path, enforce_file_format=False)
        else:
            sr.StudyInstanceUID = "1.2.3.study-7"
            sr.save_as(path, enforce_file_format=True)
        rsp = _store_as_is(port, path, monkeypatch)
        assert int(rsp.Status) == status, f"0x{int(rsp.Status):04X}"
        assert _finals(session_factory) == []
    finally:
        server.shutdown()


def test_a_nul_in_the_accession_number_is_not_an_internal_error(
    hl7_node: tuple[int, sessionmaker[Session]],
) -> None:
    """A NUL in OBR-18 (``\\X00\\``, a legacy system's padding) is no accession number
    character: the report is stored on PostgreSQL as on SQLite (it was AE 207 for ever)."""
    port, factory = hl7_node
    job = seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    message = oru(accession="ACC-1@").replace("ACC-1@", "ACC-1\\X00\\")
    assert "MSA|AA|RIS-0001" in send_mllp(message, "127.0.0.1", port).decode()
    [row] = _finals(factory)
    assert row.job_id == job and "\x00" not in (row.accession_number or "")


def test_a_nul_in_a_verified_srs_accession_number_is_not_a_database_error(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str, source: Dataset
) -> None:
    """A NUL inside an SR's Accession Number (pydicom strips only trailing padding) is left
    out, as in its TEXT values: stored (0x0000) on PostgreSQL as on SQLite, not answered
    0xA7xx "database error", which a PACS sends again for ever."""
    storescu = require_binary("storescu")
    settings = _settings(tmp_path, db_url, ae_title="CXRNODE")
    settings.prepare_runtime()
    job = seed_draft(session_factory, str(source.StudyInstanceUID), DRAFT_NO_PTX)
    sr = final_sr(source)
    sr.AccessionNumber = "ACC\x00-1"
    sr.save_as(tmp_path / "nul.dcm", enforce_file_format=True)
    sent = _storescu(storescu, settings, session_factory, tmp_path / "nul.dcm")
    assert sent.returncode == 0, sent.stderr
    [row] = _finals(session_factory)
    assert row.job_id == job and row.accession_number == "ACC-1"


def test_two_facilities_named_by_long_oids_may_use_the_same_control_id(
    hl7_node: tuple[int, sessionmaker[Session]],
) -> None:
    """MSH-4 as an HD with its ISO OID (``RADIOLOGY^2.16.840.1.113883.3.72.5.9.1.101^ISO``):
    two facilities of one organisation differ only in the OID's last arc. Each one's message
    with control ID 1001 is its own final, not the other's acknowledged and dropped."""
    port, factory = hl7_node
    chest = seed_draft(factory, STUDY_UID, DRAFT_NO_PTX)
    other = seed_draft(factory, "1.2.826.0.1.3680043.8.498.88", DRAFT_NO_PTX, accession="ACC-88")
    facility = "MSH|^~\\&|RIS|RADIOLOGY^2.16.840.1.113883.3.72.5.9.1.{}^ISO|"
    first = oru(control="1001").replace("MSH|^~\\&|RIS|RADIOLOGY|", facility.format(101), 1)
    second = oru(control="1001", zds=False, accession="ACC-88").replace(
        "MSH|^~\\&|RIS|RADIOLOGY|", facility.format(102), 1
    )
    for message in (first, second, first):
        assert "MSA|AA|1001" in send_mllp(message, "127.0.0.1", port).decode()
    rows = _finals(factory)
    assert [r.job_id for r in rows] == [chest, other]


def _pdf_showing(string: bytes) -> bytes:
    """A one-page PDF whose content stream shows ``string`` (a PDF literal string) in
    Helvetica, written as a dictation system may (no Unicode map)."""
    stream = b"BT /F1 12 Tf 72 720 Td (" + string + b") Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO(b"%PDF-1.4\n")
    out.seek(0, io.SEEK_END)
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.writelines(b"%010d 00000 n \n" % offset for offset in offsets)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1))
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def test_a_nul_in_a_trusted_pdfs_text_is_not_a_database_error(
    session_factory: sessionmaker[Session], tmp_path: Path, db_url: str, source: Dataset
) -> None:
    """A PDF's text layer may hold a NUL (a string shown with ``\\000``, a font without a
    Unicode map): it is left out, as in an SR's TEXT, and the final from a report source is
    stored (0x0000) on PostgreSQL as on SQLite, not answered 0xA7xx for ever."""
    storescu = require_binary("storescu")
    settings = _settings(tmp_path, db_url, ae_title="CXRNODE", report_sources=["RIS"])
    settings.prepare_runtime()
    job = seed_draft(session_factory, str(source.StudyInstanceUID), DRAFT_NO_PTX)
    pdf = build_encapsulated_pdf(
        _pdf_showing(b"FINDINGS: The lungs are clear.\\000 No pleural effusion."),
        source=source,
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        series_number=3,
        created_at=T0,
        algorithm_name="dictation",
        algorithm_version="1",
        demo=False,
        manufacturer="Reporting Vendor",
        software_version="7.1",
        document_title="Radiology report",
    )
    pdf.SeriesDescription = "Radiology reports"  # as a RIS writes it
    del pdf.ContributingEquipmentSequence
    pdf.save_as(tmp_path / "nul.dcm", enforce_file_format=True)
    sent = _storescu(storescu, settings, session_factory, tmp_path / "nul.dcm")
    assert sent.returncode == 0, sent.stderr
    [row] = _finals(session_factory)
    assert row.job_id == job and "\x00" not in row.full_text
    assert "The lungs are clear. No pleural effusion." in row.full_text
