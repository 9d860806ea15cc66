"""The pipeline on real studies, real databases and the demo model: draft row + SR file."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid
from sqlalchemy import select

from integration.sr import DEMO_NOTE
from integration.uids import sr_series_uid
from models.results import ReportDraft
from node.db import drafts as drafts_db
from node.db import finals as finals_db
from node.db import job_admin
from node.db import jobs as jobs_db
from node.db import withdrawals as withdrawals_db
from node.db.conversations import draft_text
from node.db.deliveries import claim_due_deliveries, enqueue_deliveries, mark_sent
from node.db.finals import DraftMatch
from node.db.models import AuditLog, DeliveryState, Job, JobState, utcnow
from node.runtime import completion, delivery
from node.runtime.completion import JobOutcome, build_sr, complete_job, draft_record, write_sr
from node.runtime.modelhost import ModelHost
from node.runtime.pipeline import generate_reports, run_batch
from node.runtime.prepare import PreparedJob, prepare_job
from node.runtime.spool import OUTPUTS_DIR
from node.runtime.withdrawal import withdraw
from tests.helpers import require_binary
from tests.worker.conftest import MAX_NEW_TOKENS, NodeEnv, make_cxr, make_env

OWNER = "test-host:1:abcd/w0"


def claim(env: NodeEnv, owner: str = OWNER) -> int:
    with env.session_factory() as s:
        job = jobs_db.claim_next_job(s, owner=owner, lease_seconds=60)
    assert job is not None
    return job.id


def content_texts(ds: pydicom.Dataset) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}

    def walk(items: list[pydicom.Dataset]) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                out.setdefault(name, []).append(str(item.TextValue))
            walk(list(item.get("ContentSequence", [])))

    walk(list(ds.ContentSequence))
    return out


def test_pipeline_end_to_end(env: NodeEnv, model_host: ModelHost) -> None:
    study = env.add_study(view="PA")  # the real RG1 chest CR (MONOCHROME1, 15 bit)
    [job_id] = env.queue_all()
    assert claim(env) == job_id

    [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)

    assert outcome.status == "done", outcome.error
    runtime = model_host.runtime
    expected_uid = env.expected_sr_uid(job_id)
    assert outcome.sr_uid == expected_uid
    job = env.job(job_id)
    assert job.state is JobState.done and job.lease_owner is None
    assert job.sr_sop_instance_uid == expected_uid
    assert job.selected_sop_instance_uid is not None

    [draft] = env.drafts(job_id)
    assert draft.task == "report" and draft.demo is True
    assert draft.model_name == runtime.model_name
    assert draft.model_version == runtime.model_version
    assert draft.full_text and draft.prompt and "<image>" in draft.prompt
    assert draft.generation_settings is not None
    assert draft.generation_settings["max_new_tokens"] == MAX_NEW_TOKENS
    assert draft.generation_settings["greedy"] is True
    timings = draft.timings or {}
    for key in ("load_s", "convert_s", "encode_s", "prefill_s", "decode_s", "sr_s"):
        assert timings[key] >= 0.0, key
    assert timings["tokens"] <= MAX_NEW_TOKENS and timings["prompt_tokens"] > 256

    path = env.settings.spool_dir.absolute() / OUTPUTS_DIR / f"{expected_uid}.dcm"
    assert outcome.sr_path == path and path.is_file()
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert sr.StudyInstanceUID == study
    assert sr.SeriesInstanceUID == sr_series_uid(study, runtime.model_name, runtime.model_version)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == job.selected_sop_instance_uid
    texts = content_texts(sr)
    assert DEMO_NOTE in texts["Summary"]
    assert texts["Impression"] == [draft.impression or draft.full_text]
    assert env.deliveries() == []  # no destinations configured: the SR stays in outputs

    tool = require_binary("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert not [line for line in output.splitlines() if "Error" in line], output


def test_lateral_only_study_fails_without_retry(env: NodeEnv, model_host: ModelHost) -> None:
    env.add_study(view="LL")
    [job_id] = env.queue_all()
    claim(env)

    [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)

    assert outcome.status == "failed"
    job = env.job(job_id)
    assert job.state is JobState.failed
    assert job.attempts == 1 < job.max_attempts  # permanent: not retried
    assert job.last_error is not None
    assert "no frontal" in job.last_error and "LL" in job.last_error
    assert env.drafts(job_id) == []
    assert not (env.settings.spool_dir / OUTPUTS_DIR).exists() or not list(
        (env.settings.spool_dir / OUTPUTS_DIR).glob("*.dcm")
    )


def _fails_for_good_at_convert(env: NodeEnv, model_host: ModelHost) -> str:
    """Run the study just received: its job fails at its first attempt, for good (bad pixel
    data is not retried), in the convert stage, with no draft; returns its error."""
    [job_id] = env.queue_all()
    claim(env)
    [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)
    assert outcome.status == "failed", outcome
    job = env.job(job_id)
    assert job.state is JobState.failed
    assert job.attempts == 1 < job.max_attempts  # permanent: not retried
    assert job.last_error is not None and job.last_error.startswith("convert: ")
    assert env.drafts(job_id) == []
    return job.last_error


def test_a_one_pixel_high_image_fails_with_its_shape_and_no_draft(
    env: NodeEnv, model_host: ModelHost
) -> None:
    # Rows 1, Columns 8192: 8 KiB of pixel data the resize would have blown up to
    # 256 x 2097152 pixels before the crop (4 GiB for 1 x 65535), then drafted a report on.
    line = (np.arange(8192) % 251).astype(np.uint8)[None, :]
    env.add_study(view="PA", pixels=line)
    error = _fails_for_good_at_convert(env, model_host)
    assert "1 x 8192" in error and "aspect ratio" in error


def test_a_broken_modality_lut_fails_the_job_at_once_naming_it(
    env: NodeEnv, model_host: ModelHost
) -> None:
    # LUT Data (0028,3006) is Type 1 in a Modality LUT Sequence item (PS3.3 C.11.1): an
    # image without it is bad pixel data, a permanent failure, not a retry.
    src = make_cxr(env.tmp / "mlut.dcm", study_uid=generate_uid(), view="PA")
    ds = pydicom.dcmread(src)
    item = pydicom.Dataset()
    item.LUTDescriptor = [32768, 0, 16]
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    ds.save_as(src)
    env.ingest(src)
    assert "Modality LUT Sequence (0028,3000)" in _fails_for_good_at_convert(env, model_host)


def test_an_rle_image_narrower_than_its_segments_fails_the_job_not_the_worker(
    env: NodeEnv, model_host: ModelHost
) -> None:
    # Columns (0028,0011) disagreeing with the RLE data: the decoder panics (a BaseException
    # from Rust), which went past every handler and ended the worker thread, the job left
    # running and nothing drafted after it. It is bad pixel data (PS3.3 C.7.6.3).
    src = make_cxr(env.tmp / "rle.dcm", study_uid=generate_uid(), view="PA")
    ds = pydicom.dcmread(src)
    ds.compress(RLELossless)
    ds.Columns = int(ds.Columns) - 841
    ds.save_as(src)
    env.ingest(src)
    error = _fails_for_good_at_convert(env, model_host)
    assert "Pixel Data (7FE0,0010)" in error and "cannot decode" in error


def test_a_jpeg_ls_image_whose_columns_contradict_its_codestream_is_not_drafted(
    env: NodeEnv, model_host: ModelHost
) -> None:
    # Columns (0028,0011) 1000 against a 1841-sample JPEG-LS frame header: the node drafted
    # a report on the scrambled picture DCMTK refuses to show (PS3.5 8.2).
    src = make_cxr(env.tmp / "jls.dcm", study_uid=generate_uid(), view="PA")
    ds = pydicom.dcmread(src)
    ds.compress(JPEGLSLossless)
    ds.Columns = 1000
    ds.save_as(src)
    env.ingest(src)
    assert "JPEG frame header is 1955 x 1841" in _fails_for_good_at_convert(env, model_host)


def test_frontal_is_chosen_over_lateral(env: NodeEnv, model_host: ModelHost) -> None:
    from pydicom.uid import generate_uid

    from tests.worker.conftest import nih_pixels

    study = generate_uid()
    env.add_study(study_uid=study, view="LL", pixels=nih_pixels(1))
    env.add_study(study_uid=study, view="PA", pixels=nih_pixels(0))
    [job_id] = env.queue_all()
    claim(env)
    [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)
    assert outcome.status == "done", outcome.error
    assert outcome.sr_path is not None
    sr = pydicom.dcmread(outcome.sr_path)
    with env.session_factory() as s:
        info = drafts_db.job_study(s, job_id)
    views = {i.sop_instance_uid: i.view_position for i in info.instances}
    assert len(views) == 2
    # both images are the SR's evidence; the tree's IMAGE items name the one the model read
    evidence = {
        ref.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == set(views)
    read = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for heading in sr.ContentSequence
        for text in heading.get("ContentSequence", [])
        for item in text.get("ContentSequence", [])
        if item.ValueType == "IMAGE"
    }
    assert [views[uid] for uid in read] == ["PA"]
    assert env.job(job_id).selected_sop_instance_uid in read


def test_rerun_after_lease_expiry_same_sr_uid_no_duplicate_deliveries(
    db_url: str, tmp_path: Path, demo_bundle: Path, model_host: ModelHost
) -> None:
    dests = "PACS@127.0.0.1:11113,ARCHIVE@127.0.0.1:11114"
    env = make_env(db_url, tmp_path, demo_bundle, destinations=dests)
    try:
        study = env.add_study(view="PA")
        [job_id] = env.queue_all()
        # worker 1 gets as far as queueing the deliveries, then dies before finishing
        dead = "dead-host:7:dead/w0"
        claim(env, dead)
        prepared = prepare_job(env.deps, job_id)
        with model_host.use() as runtime:
            [draft] = generate_reports(runtime, [prepared.model_input], env.settings)
        first = write_sr(build_sr(prepared.image, draft), env.deps.outputs_dir)
        with env.session_factory() as s:
            drafts_db.save_draft(
                s,
                job_id,
                owner=dead,
                draft=draft_record(draft, {}),
            )
        with env.session_factory() as s:
            first_ids = enqueue_deliveries(
                s,
                job_id=job_id,
                sr_path=f"{OUTPUTS_DIR}/{first.name}",
                destinations=dests.split(","),
            )
        assert len(first_ids) == 2
        first_texts = content_texts(pydicom.dcmread(first))
        first_inode = first.stat().st_ino
        # its lease expires; the job runs again on another worker
        with env.session_factory() as s:
            assert jobs_db.expire_leases(s, utcnow() + timedelta(seconds=120)) == 1
        claim(env)
        [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)

        assert outcome.status == "done", outcome.error
        assert outcome.sr_path == first  # same deterministic UID, file replaced
        assert outcome.sr_uid == env.expected_sr_uid(job_id)
        assert sorted(outcome.delivery_ids) == sorted(first_ids)
        assert first.stat().st_ino != first_inode  # a new file was renamed into place
        assert content_texts(pydicom.dcmread(first)) == first_texts  # greedy: same report
        job = env.job(job_id)
        assert job.state is JobState.done and job.attempts == 2
        assert len(env.drafts(job_id)) == 1
        rows = env.deliveries(job_id)
        assert sorted(d.destination for d in rows) == sorted(dests.split(","))
        # the dead worker's late finish is refused
        with env.session_factory() as s, pytest.raises(jobs_db.LeaseLost):
            withdrawals_db.finish_job(s, job_id, owner=dead)
        # a late instance makes a new job for the study: the draft is made from other
        # inputs, so a new SR that supersedes the first (a PACS keeps the first copy of a
        # UID it holds: re-using it would leave the old text there), with its own deliveries
        env.add_study(study_uid=study, view="AP")
        [job2] = env.queue_all()
        assert job2 != job_id
        claim(env)
        [again] = run_batch(env.deps, [job2], model_host, owner=OWNER)
        assert again.status == "done" and again.sr_uid != outcome.sr_uid
        assert again.sr_uid == env.expected_sr_uid(job2)
        assert again.sr_path is not None
        newer = pydicom.dcmread(again.sr_path)
        [pred] = newer.PredecessorDocumentsSequence
        assert pred.StudyInstanceUID == study
        [ref] = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert ref.ReferencedSOPInstanceUID == outcome.sr_uid
        assert newer.SeriesInstanceUID == pydicom.dcmread(first).SeriesInstanceUID
        assert len(env.deliveries(job2)) == 2 and len(env.deliveries()) == 4
        assert len(list(env.deps.outputs_dir.glob("*.dcm"))) == 2
    finally:
        env.engine.dispose()


def test_lost_lease_abandons_outputs(sqlite_env: NodeEnv, model_host: ModelHost) -> None:
    env = sqlite_env
    env.add_study(view="PA")
    [job_id] = env.queue_all()
    claim(env)
    with env.session_factory() as s:  # another worker took the job over
        jobs_db.expire_leases(s, utcnow() + timedelta(seconds=120))
    claim(env, "other-host:2:beef/w0")
    [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)
    assert outcome.status == "abandoned"
    assert env.drafts(job_id) == []
    job = env.job(job_id)
    assert job.state is JobState.running and job.lease_owner == "other-host:2:beef/w0"


SLOW = "slow-host:7:slow/w0"


def _overtaken(
    env: NodeEnv, model_host: ModelHost, *, later_to: list[str] | None = None
) -> tuple[str, PreparedJob, ReportDraft, JobOutcome]:
    """Job 1, claimed by :data:`SLOW`, reads a new study's one image (PA) and drafts it; a
    late AP instance comes, and job 2, drafted from both (to ``later_to`` where given: its
    routing rule's choice), finishes first. The study, job 1's prepared job and draft (not
    completed yet), and job 2's outcome."""
    study = env.add_study(view="PA")
    [job1] = env.queue_all()
    claim(env, SLOW)
    prepared = prepare_job(env.deps, job1)  # job 1 reads the PA ...
    with model_host.use() as runtime:
        [draft] = generate_reports(runtime, [prepared.model_input], env.settings)
    env.add_study(study_uid=study, view="AP")  # ... when the late instance comes
    [job2] = env.queue_all()
    if later_to is not None:
        with env.session_factory() as s:
            s.get_one(Job, job2).destinations = later_to
            s.commit()
    assert claim(env) == job2
    [newer] = run_batch(env.deps, [job2], model_host, owner=OWNER)
    assert newer.status == "done", newer.error
    return study, prepared, draft, newer


def test_an_earlier_job_finishing_after_a_later_one_neither_supersedes_it_nor_goes_out(
    db_url: str, tmp_path: Path, demo_bundle: Path, model_host: ModelHost
) -> None:
    """Job 1 has read the study's one image when a late instance comes; job 2, drafted from
    both images, finishes first; then job 1 finishes. Job 1's draft is the older one: its SR
    must not name job 2's as a predecessor (PS3.3 C.17.2), and its objects must not reach a
    destination after job 2's. SQLite and PostgreSQL."""
    dests = "PACS@127.0.0.1:11113"
    env = make_env(db_url, tmp_path, demo_bundle, destinations=dests)
    try:
        study, prepared, draft, newer = _overtaken(env, model_host)
        job1, job2 = prepared.job_id, newer.job_id
        older = complete_job(env.deps, prepared, draft, owner=SLOW)  # job 1 finishes last

        assert older.sr_path is not None and older.sr_uid != newer.sr_uid
        assert "PredecessorDocumentsSequence" not in pydicom.dcmread(older.sr_path)
        [row] = env.deliveries(job1)
        assert row.state.value == "cancelled"
        assert row.last_error == f"cancelled: superseded by job {job2} before it was sent"
        assert {r.state.value for r in env.deliveries(job2)} == {"pending"}
        # the study's current draft, which finals are scored against and summaries rewrite,
        # is job 2's too, and job 1's is not offered for review
        [job2_draft] = env.drafts(job2)
        with env.session_factory() as s:
            current = finals_db.draft_for(s, study, None)
            assert current is not None and current.job_id == job2
            assert finals_db.draft_of_job(s, job1) is None
            assert draft_text(s, study_uid=study) == job2_draft.full_text
    finally:
        env.engine.dispose()


@pytest.mark.parametrize("when", ["before", "building", "enqueued"])
def test_an_earlier_job_finishing_after_the_later_draft_was_withdrawn_is_withdrawn_with_it(
    db_url: str,
    tmp_path: Path,
    demo_bundle: Path,
    model_host: ModelHost,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """Job 1 has read the study's one image when a late instance comes; job 2, drafted from
    both, finishes first and is withdrawn, as the study's current draft, ``before`` job 1
    completes, while job 1's objects are ``building``, or once they are ``enqueued``
    (before job 1 is marked done); a sender runs just before job 1 is marked done. Had job
    1 been done, the withdrawal would have taken its draft, which job 2's superseded: it is
    withdrawn in the transaction that finishes it (by ``system``, job 2's reason,
    ``with_job``), so that it is never the study's current draft, and none of it goes out,
    neither to the PACS, where job 2's draft superseded it, nor to the archive, which only
    job 1's routing chose: the sender claims nothing of a job not done. SQLite and
    PostgreSQL."""
    dests = "PACS@127.0.0.1:11113,ARCHIVE@127.0.0.1:11114"
    env = make_env(db_url, tmp_path, demo_bundle, destinations=dests)
    try:
        pacs = str(env.settings.destinations[0])
        study, prepared, draft, newer = _overtaken(env, model_host, later_to=[pacs])
        job1, job2 = prepared.job_id, newer.job_id

        def withdraw_job2() -> None:
            withdraw(env.settings, env.session_factory, job2, actor="admin", reason="wrong side")

        build, finish, follow = (
            completion.build_outputs,
            withdrawals_db.finish_job,
            completion.queue_withdrawals,
        )

        def building(*args: Any, **kwargs: Any) -> Any:
            if when == "building":
                withdraw_job2()
            return build(*args, **kwargs)

        def finishing(*args: Any, **kwargs: Any) -> Any:
            if when == "enqueued":
                withdraw_job2()
            with env.session_factory() as s:  # a sender, just before
                for row in claim_due_deliveries(s, limit=10):
                    mark_sent(s, row.id, claimed_until=row.next_attempt_at)
            return finish(*args, **kwargs)

        seen: list[DraftMatch | None] = []

        def following(*args: Any, **kwargs: Any) -> Any:
            with env.session_factory() as s:
                seen.append(finals_db.draft_for(s, study, None))
            return follow(*args, **kwargs)

        monkeypatch.setattr(completion, "build_outputs", building)
        monkeypatch.setattr(withdrawals_db, "finish_job", finishing)
        monkeypatch.setattr(completion, "queue_withdrawals", following)
        if when == "before":
            withdraw_job2()
        older = complete_job(env.deps, prepared, draft, owner=SLOW)  # job 1 finishes last

        assert older.status == "done" and seen == [None]
        job = env.job(job1)
        assert job.state is JobState.done and job.withdrawn_at is not None
        assert (job.withdrawn_by, job.withdrawn_reason) == ("system", "wrong side")
        rows = {r.destination: r for r in env.deliveries(job1)}
        assert {r.state.value for r in rows.values()} <= {"cancelled"}
        assert len(rows) == (2 if when == "enqueued" else 0)
        with env.session_factory() as s:
            assert finals_db.draft_for(s, study, None) is None
            [entry] = s.scalars(
                select(AuditLog).where(
                    AuditLog.action == "job.withdraw", AuditLog.target == f"job:{job1}"
                )
            )
        assert (entry.actor, entry.detail["with_job"]) == ("system", job2)
        # none of job 1's objects was claimed before it was done; then it was withdrawn
        assert {r.last_error for r in rows.values()} <= {
            "cancelled: the draft was withdrawn before it was sent"
        }
        assert entry.detail["reached"] == []
    finally:
        env.engine.dispose()


@pytest.mark.parametrize("before", ["enqueue", "finish"])
def test_a_job_cancelled_as_it_completes_sends_nothing(
    db_url: str,
    tmp_path: Path,
    demo_bundle: Path,
    model_host: ModelHost,
    monkeypatch: pytest.MonkeyPatch,
    before: str,
) -> None:
    """An admin cancels a running job after its worker last checked its lease: before it
    queues its objects, or after, before it is marked done (a job re-queued after a lost
    lease keeps its rows in the same way). The worker has lost the job and abandons it; it
    queues nothing, or its objects are cancelled with it, so no sender sends a cancelled
    job's draft. SQLite and PostgreSQL."""
    env = make_env(db_url, tmp_path, demo_bundle, destinations="PACS@127.0.0.1:11113")
    try:
        env.add_study(view="PA")
        [job_id] = env.queue_all()
        assert claim(env) == job_id
        module, name = (
            (delivery, "enqueue_deliveries")
            if before == "enqueue"
            else (withdrawals_db, "finish_job")
        )
        step = getattr(module, name)

        def cancelled_first(*args: Any, **kwargs: Any) -> Any:
            with env.session_factory() as s:
                job_admin.cancel_job(s, job_id, actor="admin", reason="wrong patient")
            return step(*args, **kwargs)

        monkeypatch.setattr(module, name, cancelled_first)
        [outcome] = run_batch(env.deps, [job_id], model_host, owner=OWNER)

        assert outcome.status == "abandoned"
        assert env.job(job_id).state is JobState.cancelled
        rows = env.deliveries(job_id)
        assert len(rows) == (1 if before == "finish" else 0)
        for row in rows:
            assert row.state is DeliveryState.cancelled
            assert row.last_error == "cancelled: the job was cancelled before it was sent"
        with env.session_factory() as s:
            assert claim_due_deliveries(s, limit=10) == []
            [entry] = s.scalars(select(AuditLog).where(AuditLog.action == "job.cancel"))
        assert entry.detail.get("deliveries", []) == [r.id for r in rows]
    finally:
        env.engine.dispose()
