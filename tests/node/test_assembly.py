"""Study assembly: quiet period, forced completion, chest rule, duplicates, late instances."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import jobs as jobs_db
from node.db import studies as studies_db
from node.db import study_completion as completion_db
from node.db import withdrawals as withdrawals_db
from node.db.instance_record import RecordOutcome
from node.db.models import Instance, Job, JobState, Study, StudyState
from node.runtime.assembly import SeriesFacts, evaluate_chest_rule
from node.settings import ChestRule
from tests.node.factories import T0, record, uid

RULE = ChestRule()


def sweep(
    factory: sessionmaker[Session], seconds: float, *, quiet: float = 10, max_wait: float = 600
) -> list[completion_db.CompletionResult]:
    with factory() as s:
        return completion_db.complete_quiet_studies(
            s,
            quiet_seconds=quiet,
            max_wait_seconds=max_wait,
            now=T0 + timedelta(seconds=seconds),
            rule=RULE,
        )


def jobs_of(factory: sessionmaker[Session], study_uid: str) -> list[tuple[JobState, int]]:
    with factory() as s:
        return [
            (j.state, j.id)
            for j in s.scalars(
                select(Job)
                .join(Study)
                .where(Study.study_instance_uid == study_uid)
                .order_by(Job.id)
            )
        ]


def study_row(factory: sessionmaker[Session], study_uid: str) -> Study:
    with factory() as s:
        return s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()


# --- the rule (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "body", "series_desc", "study_desc", "ok"),
    [
        ("CR", "CHEST", None, None, True),
        ("DX", "THORAX", None, None, True),
        ("DX", None, "PA Lungs", None, True),
        ("DX", None, None, "XR CHEST 2 VIEWS", True),
        ("CT", "CHEST", None, "CT CHEST", False),
        ("DX", "HAND", "Hand AP", "XR HAND", False),
        ("CR", None, None, None, False),
    ],
)
def test_chest_rule(
    modality: str, body: str | None, series_desc: str | None, study_desc: str | None, ok: bool
) -> None:
    d = evaluate_chest_rule(
        RULE, study_description=study_desc, series=[SeriesFacts(modality, body, series_desc)]
    )
    assert d.qualifies is ok
    assert d.reason
    if not ok:
        assert "Hand" not in d.reason and "XR HAND" not in d.reason  # no free text quoted


def test_chest_rule_is_configurable() -> None:
    facts = [SeriesFacts("DX", "HAND", None)]
    assert not evaluate_chest_rule(RULE, study_description=None, series=facts).qualifies
    loose = ChestRule(modalities=["DX"], require_keyword=False)
    assert evaluate_chest_rule(loose, study_description=None, series=facts).qualifies
    no_desc = ChestRule(match_descriptions=False)
    d = evaluate_chest_rule(
        no_desc, study_description="CHEST", series=[SeriesFacts("CR", None, None)]
    )
    assert not d.qualifies


# --- completion ----------------------------------------------------------------------------


def test_quiet_period_then_exactly_one_queued_job(session_factory: sessionmaker[Session]) -> None:
    study = uid()
    for i, series in enumerate(("1", "1", "2")):
        with session_factory() as s:
            out = studies_db.record_instance(
                s, record(study=study, series=f"{study}.{series}", at=T0 + timedelta(seconds=i))
            )
            assert out is RecordOutcome.new
    assert sweep(session_factory, 2 + 9.9) == []  # 9.9 s after the last instance: too early
    assert [j[0] for j in jobs_of(session_factory, study)] == [JobState.received]
    (res,) = sweep(session_factory, 2 + 10)
    assert res.state is StudyState.complete and not res.forced and res.study_uid == study
    assert jobs_of(session_factory, study) == [(JobState.queued, res.job_id)]
    st = study_row(session_factory, study)
    assert (st.instance_count, st.series_count, st.state) == (3, 2, StudyState.complete)
    assert sweep(session_factory, 100) == []  # idempotent
    assert len(jobs_of(session_factory, study)) == 1


def test_forced_completion_after_max_wait(session_factory: sessionmaker[Session]) -> None:
    study = uid()
    for i in range(0, 40, 5):  # an instance every 5 s: never quiet for 10 s
        with session_factory() as s:
            studies_db.record_instance(s, record(study=study, at=T0 + timedelta(seconds=i)))
        if i < 30:
            assert sweep(session_factory, i + 1, max_wait=30) == []
    (res,) = sweep(session_factory, 36, max_wait=30)
    assert res.forced and res.state is StudyState.complete
    assert study_row(session_factory, study).forced_completion


def test_non_chest_study_is_skipped_with_reason(session_factory: sessionmaker[Session]) -> None:
    study = uid()
    with session_factory() as s:
        studies_db.record_instance(s, record(study=study, modality="DX", body_part="HAND"))
    (res,) = sweep(session_factory, 60)
    assert res.state is StudyState.skipped
    st = study_row(session_factory, study)
    assert st.state is StudyState.skipped and "HAND" in (st.skip_reason or "")
    states = [j[0] for j in jobs_of(session_factory, study)]
    assert states == [JobState.cancelled]
    with session_factory() as s:
        assert jobs_db.claim_next_job(s, owner="w", lease_seconds=5) is None
        # the instance is stored and recorded all the same
        assert s.scalar(select(func.count(Instance.id))) == 1


def test_concurrent_sweeps_queue_one_job_per_study(session_factory: sessionmaker[Session]) -> None:
    studies = [uid() for _ in range(15)]
    for st in studies:
        with session_factory() as s:
            studies_db.record_instance(s, record(study=st))
    results: list[list[completion_db.CompletionResult]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait()
            results.append(sweep(session_factory, 60))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    completed = [r.study_uid for rs in results for r in rs]
    assert sorted(completed) == sorted(studies)  # each study completed by exactly one sweep
    with session_factory() as s:
        queued = s.scalars(select(Job).where(Job.state == JobState.queued)).all()
        assert len(queued) == 15 and len({j.study_id for j in queued}) == 15
        assert s.scalar(select(func.count(Job.id))) == 15


# --- duplicates and late instances -----------------------------------------------------------


def test_duplicate_identical_and_replaced(session_factory: sessionmaker[Session]) -> None:
    study, sop = uid(), uid()
    with session_factory() as s:
        assert (
            studies_db.record_instance(s, record(study=study, sop=sop, content=b"a"))
            is RecordOutcome.new
        )
    with session_factory() as s:
        r = studies_db.record_instance_detailed(
            s, record(study=study, sop=sop, content=b"a", spool_path="other/a.dcm")
        )
        assert (
            r.outcome is RecordOutcome.duplicate_identical
            and r.obsolete_spool_path == "other/a.dcm"
        )
    with session_factory() as s:
        r = studies_db.record_instance_detailed(
            s,
            record(
                study=study,
                sop=sop,
                content=b"bb",
                spool_path="new/b.dcm",
                at=T0 + timedelta(seconds=1),
            ),
        )
        assert r.outcome is RecordOutcome.duplicate_replaced
        assert r.obsolete_spool_path == f"{study}/{study}.1/{sop}.dcm"
    with session_factory() as s:
        inst = s.scalars(select(Instance)).one()
        assert (inst.spool_path, inst.size_bytes, inst.replaced_count) == ("new/b.dcm", 2, 1)
        st = s.scalars(select(Study)).one()
        assert st.instance_count == 1
        assert s.scalar(select(func.count(Job.id))) == 1


def test_late_instance_joins_queued_job(session_factory: sessionmaker[Session]) -> None:
    study = uid()
    with session_factory() as s:
        studies_db.record_instance(s, record(study=study))
    (res,) = sweep(session_factory, 20)
    with session_factory() as s:
        r = studies_db.record_instance_detailed(
            s, record(study=study, at=T0 + timedelta(seconds=25))
        )
    assert r.outcome is RecordOutcome.new and r.late and r.job_id == res.job_id
    assert jobs_of(session_factory, study) == [(JobState.queued, res.job_id)]
    assert study_row(session_factory, study).state is StudyState.complete


@pytest.mark.parametrize("first_job_end", ["running", "done", "failed"])
def test_late_instance_after_job_started_creates_fresh_job(
    session_factory: sessionmaker[Session], first_job_end: str
) -> None:
    study = uid()
    with session_factory() as s:
        studies_db.record_instance(s, record(study=study))
    (res,) = sweep(session_factory, 20)
    with session_factory() as s:
        job = jobs_db.claim_next_job(s, owner="w", lease_seconds=60, now=T0 + timedelta(seconds=21))
        assert job is not None and job.id == res.job_id
        if first_job_end == "done":
            withdrawals_db.finish_job(s, job.id, owner="w")
        elif first_job_end == "failed":
            jobs_db.fail_job(s, job.id, owner="w", error="x", retry=False)
    with session_factory() as s:
        r = studies_db.record_instance_detailed(
            s, record(study=study, at=T0 + timedelta(seconds=30))
        )
    assert r.outcome is RecordOutcome.late_for_finished_study and r.late
    jobs = jobs_of(session_factory, study)
    assert len(jobs) == 2 and jobs[1] == (JobState.received, r.job_id)
    assert study_row(session_factory, study).state is StudyState.receiving
    # the fresh job waits for its own quiet period, counted from the late instance
    assert sweep(session_factory, 39) == []
    (again,) = sweep(session_factory, 40)
    assert again.job_id == r.job_id and not again.forced
    assert jobs_of(session_factory, study)[1] == (JobState.queued, r.job_id)
    # a second late instance while the fresh job is queued joins it
    with session_factory() as s:
        r2 = studies_db.record_instance_detailed(
            s, record(study=study, at=T0 + timedelta(seconds=41))
        )
    assert r2.outcome is RecordOutcome.new and r2.job_id == r.job_id


def test_late_instance_reopens_skipped_study(session_factory: sessionmaker[Session]) -> None:
    study = uid()
    with session_factory() as s:
        studies_db.record_instance(
            s, record(study=study, series=f"{study}.1", modality="DX", body_part="PELVIS")
        )
    sweep(session_factory, 20)
    with session_factory() as s:
        out = studies_db.record_instance(
            s, record(study=study, series=f"{study}.2", at=T0 + timedelta(seconds=30))
        )
    assert out is RecordOutcome.late_for_finished_study
    (res,) = sweep(session_factory, 45)
    assert res.state is StudyState.complete  # the late chest series qualifies the study
    assert [j[0] for j in jobs_of(session_factory, study)] == [JobState.cancelled, JobState.queued]


def test_instance_record_validates_uids() -> None:
    with pytest.raises(ValueError, match=r"SOP Instance UID \(0008,0018\)"):
        record(study=uid(), sop="not-a-uid")
    with pytest.raises(ValueError, match=r"Study Instance UID"):
        record(study="1.2." + "3" * 70)


def test_concurrent_instances_of_one_new_study(session_factory: sessionmaker[Session]) -> None:
    """Several associations storing the same new study at once: one study, one job."""
    study = uid()
    n_threads, per_thread = 4, 5
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    outcomes: list[RecordOutcome] = []

    def sender(k: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                rec = record(study=study, series=f"{study}.{k % 2}", content=f"{k}-{i}".encode())
                with session_factory() as s:
                    outcomes.append(studies_db.record_instance(s, rec))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert outcomes == [RecordOutcome.new] * (n_threads * per_thread)
    st = study_row(session_factory, study)
    assert (st.instance_count, st.series_count) == (n_threads * per_thread, 2)
    assert [j[0] for j in jobs_of(session_factory, study)] == [JobState.received]


def test_replaced_duplicate_of_finished_study_reruns(
    session_factory: sessionmaker[Session],
) -> None:
    study, sop = uid(), uid()
    with session_factory() as s:
        studies_db.record_instance(s, record(study=study, sop=sop, content=b"v1"))
    sweep(session_factory, 20)
    with session_factory() as s:
        job = jobs_db.claim_next_job(s, owner="w", lease_seconds=60, now=T0 + timedelta(seconds=21))
        assert job is not None
        withdrawals_db.finish_job(s, job.id, owner="w")
    # the PACS sends a corrected version of the same instance: the draft must be redone
    with session_factory() as s:
        r = studies_db.record_instance_detailed(
            s, record(study=study, sop=sop, content=b"v2", at=T0 + timedelta(seconds=30))
        )
    assert r.outcome is RecordOutcome.duplicate_replaced and r.late
    assert [j[0] for j in jobs_of(session_factory, study)] == [JobState.done, JobState.received]
    # an identical re-send changes nothing and creates no job
    with session_factory() as s:
        again = studies_db.record_instance(
            s, record(study=study, sop=sop, content=b"v2", at=T0 + timedelta(seconds=31))
        )
    assert again is RecordOutcome.duplicate_identical
    assert len(jobs_of(session_factory, study)) == 2
