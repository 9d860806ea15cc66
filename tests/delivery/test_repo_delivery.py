"""Delivery queries (node.db.deliveries) on SQLite and PostgreSQL: idempotent enqueue,
claim leases and fencing, retry / failed / sent records, admin re-send with audit."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from node.db import deliveries as deliveries_db
from node.db import delivery_claims, delivery_views, job_admin, job_list
from node.db import jobs as jobs_db
from node.db import withdrawals as withdrawals_db
from node.db.deliveries import Outbound
from node.db.jobs import JobConflict, JobNotFound, LeaseLost
from node.db.models import (
    AuditLog,
    Delivery,
    DeliveryKind,
    DeliveryObject,
    DeliveryState,
    Job,
    JobEvent,
    JobState,
    utcnow,
)
from node.db.views import DeliveryRow, counts
from node.runtime.delivery import backoff_seconds
from node.settings import DicomDestination, Hl7Destination, StowDestination
from tests.delivery.conftest import NodeDB, make_job
from tests.node.factories import add_redraft

DESTS: list[DicomDestination | StowDestination] = [
    DicomDestination(ae_title="PACS", host="127.0.0.1", port=104),
    StowDestination(url="http://127.0.0.1:8042/dicom-web"),
]


def _rows(db: NodeDB, job_id: int) -> list[Delivery]:
    with db.factory() as s:
        return list(s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by("id")))


def _listed(db: NodeDB, job_id: int) -> DeliveryRow:
    """The job's first delivery as listed, read through a new session: the fenced updates
    (mark_*, release_claim) bypass an open session's objects."""
    with db.factory() as s:
        return delivery_views.list_deliveries(s, job_id=job_id)[0]


def _one_pending(db: NodeDB) -> tuple[int, int, datetime]:
    """A new job with one DIMSE delivery queued now: (job id, delivery id, now)."""
    job = make_job(db.factory)
    t0 = utcnow()
    with db.factory() as s:
        (did,) = deliveries_db.enqueue_deliveries(
            s, job_id=job, sr_path="/sr.dcm", destinations=DESTS[:1], now=t0
        )
    return job, did, t0


def test_enqueue_is_idempotent_per_job_and_destination(node_db: NodeDB) -> None:
    job = make_job(node_db.factory)
    with node_db.factory() as s:
        ids = deliveries_db.enqueue_deliveries(
            s, job_id=job, sr_path="/sr/a.dcm", destinations=DESTS
        )
    assert len(ids) == 2
    rows = _rows(node_db, job)
    assert [r.kind for r in rows] == [DeliveryKind.dimse, DeliveryKind.stow]
    assert [r.destination for r in rows] == [
        "PACS@127.0.0.1:104",
        "http://127.0.0.1:8042/dicom-web",
    ]
    assert all(r.state is DeliveryState.pending and r.attempts == 0 for r in rows)

    # the first one is sent, the second fails; then the job is re-run with a new SR file
    with node_db.factory() as s:
        claimed = deliveries_db.claim_due_deliveries(s, limit=10)
        assert {c.id for c in claimed} == set(ids)
        assert deliveries_db.mark_sent(s, ids[0], claimed_until=claimed[0].next_attempt_at)
        assert deliveries_db.mark_failed(
            s, ids[1], error="permanent", claimed_until=claimed[1].next_attempt_at
        )
    with node_db.factory() as s:
        # text destinations are the same destinations; duplicates collapse
        again = deliveries_db.enqueue_deliveries(
            s,
            job_id=job,
            sr_path="/sr/b.dcm",
            destinations=["PACS@127.0.0.1:104", "http://127.0.0.1:8042/dicom-web", DESTS[0]],
        )
    assert again == ids
    rows = _rows(node_db, job)
    assert len(rows) == 2
    for r in rows:
        assert r.state is DeliveryState.pending and r.attempts == 0
        assert r.sr_path == "/sr/b.dcm" and r.sent_at is None and r.last_error is None
    with node_db.factory() as s:
        assert delivery_views.delivery_counts(s) == {
            "pending": 2,
            "sent": 0,
            "failed": 0,
            "cancelled": 0,
        }
        with pytest.raises(JobNotFound):
            deliveries_db.enqueue_deliveries(s, job_id=job + 999, sr_path="/x", destinations=DESTS)
        with pytest.raises(ValueError):
            deliveries_db.enqueue_deliveries(s, job_id=job, sr_path="/x", destinations=["no-port"])


def test_claim_lease_fencing_and_retry(node_db: NodeDB) -> None:
    job, did, t0 = _one_pending(node_db)
    with node_db.factory() as s:
        assert _listed(node_db, job).last_attempt_at is None
        first = deliveries_db.claim_due_deliveries(s, now=t0, lease_seconds=60)
        assert [d.id for d in first] == [did] and first[0].attempts == 1
        assert first[0].last_attempt_at == t0
        lease1 = first[0].next_attempt_at
        assert lease1 == t0 + timedelta(seconds=60)
        # while the lease holds, nobody else gets the row
        assert deliveries_db.claim_due_deliveries(s, now=t0 + timedelta(seconds=59)) == []
        # the first sender died: after the lease the row is claimed again (attempt 2)
        second = deliveries_db.claim_due_deliveries(
            s, now=t0 + timedelta(seconds=61), lease_seconds=60
        )
        assert [d.id for d in second] == [did] and second[0].attempts == 2
        lease2 = second[0].next_attempt_at
        # the late result of the first claim is ignored
        assert not deliveries_db.mark_sent(s, did, claimed_until=lease1)
        assert deliveries_db.mark_retry(
            s,
            did,
            error="cannot connect",
            next_attempt_at=t0 + timedelta(seconds=100),
            claimed_until=lease2,
        )
        # the retry keeps when its attempt started (the second claim)
        listed = _listed(node_db, job)
        assert listed.last_attempt_at == t0 + timedelta(seconds=61)
        assert deliveries_db.claim_due_deliveries(s, now=t0 + timedelta(seconds=99)) == []
        third = deliveries_db.claim_due_deliveries(
            s, now=t0 + timedelta(seconds=100), lease_seconds=5
        )
        assert [d.attempts for d in third] == [3]
        listed = _listed(node_db, job)
        assert listed.last_attempt_at == t0 + timedelta(seconds=100)
        # shutdown: the claim is given back, the attempt not counted; after earlier attempts
        # the row keeps the released claim's start
        assert deliveries_db.release_claim(
            s, did, claimed_until=third[0].next_attempt_at, now=t0 + timedelta(seconds=101)
        )
        listed = _listed(node_db, job)
        assert listed.attempts == 2
        assert listed.last_attempt_at == t0 + timedelta(seconds=100)
        fourth = deliveries_db.claim_due_deliveries(s, now=t0 + timedelta(seconds=101))
        assert [d.attempts for d in fourth] == [3]
        assert deliveries_db.mark_sent(
            s, did, claimed_until=fourth[0].next_attempt_at, note="warning 0xB000"
        )
        assert not deliveries_db.mark_failed(s, did, error="late")  # sent is final for the sender
    (row,) = _rows(node_db, job)
    assert row.state is DeliveryState.sent and row.sent_at is not None
    assert row.last_error == "warning 0xB000" and row.next_attempt_at is None
    assert row.last_attempt_at == t0 + timedelta(seconds=101)


def test_released_first_claim_leaves_no_attempt(node_db: NodeDB) -> None:
    job, did, t0 = _one_pending(node_db)
    with node_db.factory() as s:
        (claim,) = deliveries_db.claim_due_deliveries(s, now=t0, lease_seconds=60)
        assert _listed(node_db, job).last_attempt_at == t0
        # shut down before sending: nothing was attempted, and the row says so
        assert deliveries_db.release_claim(
            s, did, claimed_until=claim.next_attempt_at, now=t0 + timedelta(seconds=1)
        )
        listed = _listed(node_db, job)
        assert listed.attempts == 0 and listed.last_attempt_at is None
        (again,) = deliveries_db.claim_due_deliveries(s, now=t0 + timedelta(seconds=1))
        assert again.attempts == 1 and again.last_attempt_at == t0 + timedelta(seconds=1)


def test_resend_requeues_and_audits(node_db: NodeDB) -> None:
    job = make_job(node_db.factory)
    other = make_job(node_db.factory)
    with node_db.factory() as s:
        ids = deliveries_db.enqueue_deliveries(s, job_id=job, sr_path="/sr.dcm", destinations=DESTS)
        deliveries_db.enqueue_deliveries(s, job_id=other, sr_path="/o.dcm", destinations=DESTS[:1])
        for d in deliveries_db.claim_due_deliveries(s, limit=10):
            if d.job_id == job:
                deliveries_db.mark_sent(s, d.id, claimed_until=d.next_attempt_at)
            else:
                deliveries_db.mark_failed(s, d.id, error="gave up", claimed_until=d.next_attempt_at)
        assert delivery_views.delivery_counts(s) == {
            "pending": 0,
            "sent": 2,
            "failed": 1,
            "cancelled": 0,
        }
        assert counts(s).deliveries == delivery_views.delivery_counts(s)
        assert deliveries_db.resend(s, job, actor="admin:alice") == ids
        assert delivery_views.delivery_counts(s) == {
            "pending": 2,
            "sent": 0,
            "failed": 1,
            "cancelled": 0,
        }
        entry = s.scalars(select(AuditLog).where(AuditLog.action == "job.resend")).one()
        assert entry.actor == "admin:alice" and entry.target == f"job:{job}"
        assert entry.detail == {"deliveries": {str(i): "sent" for i in ids}}
        with pytest.raises(JobNotFound):
            deliveries_db.resend(s, job + 999, actor="admin:alice")
        assert s.scalar(select(func.count(AuditLog.id))) == 1
        listed = delivery_views.list_deliveries(s, state="failed")
        assert [(x.job_id, x.last_error) for x in listed] == [(other, "gave up")]
        assert {x.id for x in delivery_views.list_deliveries(s, job_id=job)} == set(ids)


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    values = [backoff_seconds(n, base=5, cap=600, rng=rng) for n in range(1, 12)]
    for n, v in enumerate(values, start=1):
        nominal = min(5 * 2 ** (n - 1), 600)
        assert 0.9 * nominal <= v <= min(1.1 * nominal, 600)
    assert values[-1] <= 600 and values[0] < values[3] < values[6]
    assert len({round(v, 6) for v in values[:6]}) == 6  # jitter: not lock-step
    assert backoff_seconds(10_000, base=1, cap=30, jitter=0) == 30
    with pytest.raises(ValueError):
        backoff_seconds(0, base=1, cap=2)


def test_withdraw_cancels_unsent_rows_so_no_requeue_sends_them(node_db: NodeDB) -> None:
    job = make_job(node_db.factory)
    with node_db.factory() as s:
        s.get_one(Job, job).sr_sop_instance_uid = "2.25.1"
        s.commit()
        deliveries_db.enqueue_deliveries(s, job_id=job, sr_path="/sr.dcm", destinations=DESTS)
        [first] = deliveries_db.claim_due_deliveries(s, limit=1)
        # the PACS was down for the whole horizon: failed, not permanent
        deliveries_db.mark_failed(s, first.id, error="gave up", claimed_until=first.next_attempt_at)
        assert deliveries_db.failed_destinations(s) == ["PACS@127.0.0.1:104"]
        with pytest.raises(ValueError, match="at most 256"):
            withdrawals_db.withdraw_job(s, job, actor="admin", reason="x" * 257)
        done = withdrawals_db.withdraw_job(s, job, actor="admin", reason="wrong patient")
    assert len(done.cancelled) == 2
    # the failed row was attempted: the PACS may hold the SR, it gets the withdrawal
    assert list(done.reached) == ["PACS@127.0.0.1:104"]
    assert {r.state for r in _rows(node_db, job)} == {DeliveryState.cancelled}
    with node_db.factory() as s:
        assert deliveries_db.failed_destinations(s) == []
        assert deliveries_db.requeue_failed(s, "PACS@127.0.0.1:104", reason="C-ECHO answered") == []
        assert deliveries_db.resend(s, job, actor="admin") == []  # cancelled drafts stay cancelled
        with pytest.raises(JobConflict, match="withdrawn already"):
            withdrawals_db.withdraw_job(s, job, actor="admin", reason="again")


def _redraft(db: NodeDB, job_id: int) -> int:
    """A later ``done`` job of job ``job_id``'s study (a late instance drafted again)."""
    with db.factory() as s:
        job = add_redraft(
            s, job_id, "IMPRESSION: later.", at=utcnow(), sr_sop_instance_uid="2.25.2"
        )
        s.commit()
        return job.id


def _drafted_twice(db: NodeDB) -> tuple[int, int]:
    """A ``done`` job with an SR and a later ``done`` job of its study (:func:`_redraft`)."""
    job1 = make_job(db.factory)
    job2 = _redraft(db, job1)
    with db.factory() as s:
        s.get_one(Job, job1).sr_sop_instance_uid = "2.25.1"
        s.commit()
    return job1, job2


def test_a_later_draft_cancels_the_earlier_jobs_unsent_rows_to_its_destinations(
    node_db: NodeDB,
) -> None:
    pacs = str(DESTS[0])
    job1, other = make_job(node_db.factory), make_job(node_db.factory)
    job2 = _redraft(node_db, job1)
    with node_db.factory() as s:
        objects = [DeliveryObject.sr, DeliveryObject.basic_sr, DeliveryObject.pdf]
        ids = deliveries_db.enqueue_deliveries(
            s,
            job_id=job1,
            items=[Outbound(d, o, f"/{o.value}.dcm") for d in DESTS for o in objects],
        )
        [other_row] = deliveries_db.enqueue_deliveries(
            s, job_id=other, sr_path="/o.dcm", destinations=[pacs]
        )
        claims = {c.id: c.next_attempt_at for c in deliveries_db.claim_due_deliveries(s, limit=10)}
        p_sr, p_basic, p_pdf, s_sr, s_basic, s_pdf = ids
        assert deliveries_db.mark_sent(s, p_sr, claimed_until=claims[p_sr])
        for failed in (p_basic, s_basic):
            assert deliveries_db.mark_failed(
                s, failed, error="gave up", claimed_until=claims[failed]
            )
        for due in (s_sr, s_pdf, other_row):
            assert deliveries_db.release_claim(s, due, claimed_until=claims[due])
        # p_pdf stays claimed: a sender is sending it
        [withdrawal] = deliveries_db.enqueue_deliveries(
            s, job_id=job1, items=[Outbound(pacs, DeliveryObject.withdrawal, "/kos.dcm")]
        )
        # job 2's draft goes to the PACS only (its routing rule)
        new = deliveries_db.enqueue_deliveries(
            s,
            job_id=job2,
            items=[Outbound(pacs, o, f"/2-{o.value}.dcm") for o in objects],
            supersede=True,
        )
    rows = {r.id: r for r in _rows(node_db, job1) + _rows(node_db, job2) + _rows(node_db, other)}
    reason = f"cancelled: superseded by job {job2} before it was sent"
    # the PDF being sent keeps its claim's end: job 2's objects to the PACS wait for it
    for cancelled, kept in ((p_basic, None), (p_pdf, claims[p_pdf])):
        row = rows[cancelled]
        assert (row.state, row.next_attempt_at, row.last_error) == (
            DeliveryState.cancelled,
            kept,
            reason,
        )
    assert rows[p_sr].state is DeliveryState.sent
    assert rows[withdrawal].state is DeliveryState.pending
    assert [rows[i].state for i in (s_sr, s_basic, s_pdf)] == [
        DeliveryState.pending,
        DeliveryState.failed,
        DeliveryState.pending,
    ]
    assert rows[other_row].state is DeliveryState.pending  # another study
    assert {rows[i].state for i in new} == {DeliveryState.pending}
    with node_db.factory() as s:
        [entry] = s.scalars(select(AuditLog).where(AuditLog.action == "delivery.supersede"))
        assert (entry.actor, entry.target) == ("system", f"job:{job2}")
        assert entry.detail == {"cancelled": [p_basic, p_pdf], "jobs": [job1]}
        # the send in flight finishes: its result is not recorded, the row stays cancelled
        assert not deliveries_db.mark_sent(s, p_pdf, claimed_until=claims[p_pdf])
        assert deliveries_db.requeue_failed(s, pacs, reason="C-ECHO answered") == []
        # job 2 queued again (a re-run): nothing more to cancel, no second entry
        deliveries_db.enqueue_deliveries(
            s,
            job_id=job2,
            items=[Outbound(pacs, o, f"/2-{o.value}.dcm") for o in objects],
            supersede=True,
        )
        assert s.scalar(select(func.count()).where(AuditLog.action == "delivery.supersede")) == 1
        assert p_basic not in deliveries_db.resend(s, job1, actor="admin")
    assert [node_db.delivery(i).state for i in (p_basic, p_pdf)] == [DeliveryState.cancelled] * 2


def test_a_draft_cancels_nothing_of_a_later_or_another_studys_job(node_db: NodeDB) -> None:
    """The lone job of its study cancels nothing; an earlier job that finishes after a later
    one (a re-run after its lease passed, a retry) leaves the later, newer draft alone and
    cancels its own rows to the destinations the later one was queued to, not to another."""
    pacs, stow = (str(d) for d in DESTS)
    job1, other = make_job(node_db.factory), make_job(node_db.factory)
    job2 = _redraft(node_db, job1)
    with node_db.factory() as s:
        later = deliveries_db.enqueue_deliveries(
            s, job_id=job2, sr_path="/2.dcm", destinations=[pacs]
        )
        elsewhere = deliveries_db.enqueue_deliveries(
            s, job_id=other, sr_path="/o.dcm", destinations=DESTS
        )
        deliveries_db.enqueue_deliveries(
            s, job_id=other, sr_path="/o.dcm", destinations=DESTS, supersede=True
        )
        assert s.scalar(select(func.count()).where(AuditLog.action == "delivery.supersede")) == 0
        for _again in range(2):  # a second run of job 1 cancels it again
            deliveries_db.enqueue_deliveries(
                s, job_id=job1, sr_path="/1.dcm", destinations=DESTS, supersede=True
            )
    assert {node_db.delivery(i).state for i in later + elsewhere} == {DeliveryState.pending}
    rows = {r.destination: r for r in _rows(node_db, job1)}
    assert rows[pacs].state is DeliveryState.cancelled
    assert rows[pacs].last_error == f"cancelled: superseded by job {job2} before it was sent"
    assert rows[stow].state is DeliveryState.pending  # job 2 does not send there
    with node_db.factory() as s:
        entries = list(s.scalars(select(AuditLog).where(AuditLog.action == "delivery.supersede")))
    assert [(e.target, e.detail) for e in entries] == [
        (f"job:{job1}", {"cancelled": [rows[pacs].id], "jobs": [job1]})
    ] * 2


def test_a_rerun_after_a_later_draft_keeps_what_the_earlier_run_sent(node_db: NodeDB) -> None:
    """Job 1's SR was sent to the PACS; job 1 then ran again (its lease had passed before it
    finished) after job 2 queued its draft there. The re-run must not turn the sent row into
    one "superseded before it was sent": withdrawing job 1 must still reach the PACS, which
    holds its SR. Before, the re-run reset the row to pending (no attempts, not sent) and
    cancelled it, and the withdrawal went nowhere."""
    pacs = str(DESTS[0])
    job1, job2 = _drafted_twice(node_db)
    with node_db.factory() as s:
        [row_id] = deliveries_db.enqueue_deliveries(
            s, job_id=job1, sr_path="/1.dcm", destinations=[pacs], supersede=True
        )
        [claimed] = deliveries_db.claim_due_deliveries(s, limit=10)
        assert deliveries_db.mark_sent(s, row_id, claimed_until=claimed.next_attempt_at)
        deliveries_db.enqueue_deliveries(
            s, job_id=job2, sr_path="/2.dcm", destinations=[pacs], supersede=True
        )
        deliveries_db.enqueue_deliveries(  # job 1's re-run
            s, job_id=job1, sr_path="/1.dcm", destinations=[pacs], supersede=True
        )
    row = node_db.delivery(row_id)
    assert (row.state, row.attempts) == (DeliveryState.sent, 1)
    with node_db.factory() as s:
        done = withdrawals_db.withdraw_job(s, job1, actor="admin", reason="wrong side")
    assert list(done.reached) == [pacs]


def test_a_later_draft_withdrawn_before_it_was_sent_supersedes_nothing(
    node_db: NodeDB,
) -> None:
    """Job 2 queued its draft to the PACS and was withdrawn before it was sent (its row
    cancelled, never attempted), alone: job 3's draft, later still, is the study's current
    one and does not go to the PACS (its routing rule). Job 1, which had read the study
    before the late instances, finishes only then. Job 2's row never reached the PACS and
    replaced nothing there, and no later draft went there: job 1's draft goes out, and a
    re-send sends it again. Before, job 1 cancelled its own row as "superseded by job 2"
    and the re-send left it."""
    pacs = str(DESTS[0])
    job1 = make_job(node_db.factory)
    job2 = _redraft(node_db, job1)
    with node_db.factory() as s:
        add_redraft(s, job1, "IMPRESSION: latest.", at=utcnow(), sr_sop_instance_uid="2.25.3")
        s.get_one(Job, job1).state = JobState.running  # still drafting
        s.commit()
        deliveries_db.enqueue_deliveries(
            s, job_id=job2, sr_path="/2.dcm", destinations=[pacs], supersede=True
        )
        done = withdrawals_db.withdraw_job(s, job2, actor="admin", reason="wrong side")
        assert done.reached == {} and done.superseded == []
        job = s.get_one(Job, job1)
        job.state, job.sr_sop_instance_uid = JobState.done, "2.25.1"
        s.commit()
        [row_id] = deliveries_db.enqueue_deliveries(
            s, job_id=job1, sr_path="/1.dcm", destinations=[pacs], supersede=True
        )
    row = node_db.delivery(row_id)
    assert (row.state, row.last_error) == (DeliveryState.pending, None)
    with node_db.factory() as s:
        [claimed] = deliveries_db.claim_due_deliveries(s, limit=10)
        assert deliveries_db.mark_sent(s, row_id, claimed_until=claimed.next_attempt_at)
        assert deliveries_db.resend(s, job1, actor="admin") == [row_id]


def test_a_resent_draft_withdrawn_before_the_resend_still_reaches_the_pacs(
    node_db: NodeDB,
) -> None:
    """Job 2's SR was sent to the PACS, which holds it; the operator re-sends it and then
    withdraws it before the sender picks the row up. The re-send made the row pending with
    no attempt, and the withdrawal took it for one never sent: no rejection note for the
    PACS, which kept job 2's SR as its AI draft. Its ``last_attempt_at`` says it may be
    there (``Delivery.may_have_reached``)."""
    pacs = str(DESTS[0])
    job1, job2 = _drafted_twice(node_db)
    with node_db.factory() as s:
        for job in (job1, job2):
            [row] = deliveries_db.enqueue_deliveries(
                s, job_id=job, sr_path=f"/{job}.dcm", destinations=[pacs], supersede=True
            )
            [claimed] = deliveries_db.claim_due_deliveries(s, limit=10)
            assert deliveries_db.mark_sent(s, row, claimed_until=claimed.next_attempt_at)
        assert deliveries_db.resend(s, job2, actor="admin") == [row]
        done = withdrawals_db.withdraw_job(s, job2, actor="admin", reason="wrong side")
    assert done.cancelled == [row] and list(done.reached) == [pacs]
    [earlier] = done.superseded
    assert (earlier.job_id, list(earlier.reached)) == (job1, [pacs])


def test_a_send_recorded_while_its_job_is_withdrawn_does_not_deadlock(
    node_db: NodeDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1's SR is being recorded as sent to the STOW-RS server (job 2 does not go
    there) when job 2, the current draft, is withdrawn and takes job 1 with it. Recording
    the send updates the delivery row, then adds a job event (its key refers to job 1:
    ``FOR KEY SHARE``); the withdrawal locks job 1, then its deliveries. With the job
    locked ``FOR UPDATE``, PostgreSQL found a deadlock and aborted one side."""
    pacs, stow = str(DESTS[0]), str(DESTS[1])
    job1, job2 = _drafted_twice(node_db)
    with node_db.factory() as s:
        [row1] = deliveries_db.enqueue_deliveries(
            s, job_id=job1, sr_path="/1.dcm", destinations=[stow], supersede=True
        )
        deliveries_db.enqueue_deliveries(
            s, job_id=job2, sr_path="/2.dcm", destinations=[pacs], supersede=True
        )
        claimed = {c.id: c for c in deliveries_db.claim_due_deliveries(s, limit=10)}
    errors: list[BaseException] = []
    done: list[withdrawals_db.Withdrawal] = []

    def withdraw() -> None:
        try:
            with node_db.factory() as s:
                done.append(withdrawals_db.withdraw_job(s, job2, actor="admin", reason="x"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=withdraw)
    add_event = delivery_claims.add_event

    def withdrawn_meanwhile(*args: Any, **kwargs: Any) -> Any:
        thread.start()  # the withdrawal runs while the sent row is locked, uncommitted
        thread.join(timeout=1.5)
        return add_event(*args, **kwargs)

    monkeypatch.setattr(delivery_claims, "add_event", withdrawn_meanwhile)
    with node_db.factory() as s:
        recorded = deliveries_db.mark_sent(s, row1, claimed_until=claimed[row1].next_attempt_at)
    thread.join(timeout=30)
    assert errors == [] and not thread.is_alive()
    # the send is recorded, then the withdrawal finds the SR reached the STOW-RS server
    [earlier] = done[0].superseded
    assert recorded and (earlier.job_id, list(earlier.reached)) == (job1, [stow])


def test_two_jobs_of_a_study_queued_at_once_still_supersede(
    node_db: NodeDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1 (read before a late instance) and job 2 (drafted from every image), both done
    (so each enqueue supersedes in its own transaction, as a finish does), queue their
    drafts to the PACS at the same moment, in two transactions. Whichever commits first, job
    1's row must end cancelled. On PostgreSQL (READ COMMITTED) neither transaction saw the
    other's uncommitted rows: job 2 found no row of job 1 to cancel and job 1 no later draft,
    and both went out, the older after the newer. The enqueue now takes the study's lock
    first, so the second waits for the first. (SQLite's BEGIN IMMEDIATE serializes them.)"""
    pacs = str(DESTS[0])
    job1 = make_job(node_db.factory)
    job2 = _redraft(node_db, job1)
    both = threading.Barrier(2)
    original = deliveries_db.supersede_older

    def meet(session: Any, job_id: int, *args: Any) -> Any:
        with contextlib.suppress(threading.BrokenBarrierError):
            both.wait(timeout=2)  # both transactions have queued their rows, uncommitted
        return original(session, job_id, *args)

    monkeypatch.setattr(deliveries_db, "supersede_older", meet)
    errors: list[BaseException] = []

    def queue(job_id: int) -> None:
        try:
            with node_db.factory() as s:
                deliveries_db.enqueue_deliveries(
                    s, job_id=job_id, sr_path=f"/{job_id}.dcm", destinations=[pacs], supersede=True
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=queue, args=(j,)) for j in (job1, job2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    [old], [new] = _rows(node_db, job1), _rows(node_db, job2)
    assert new.state is DeliveryState.pending
    assert old.state is DeliveryState.cancelled
    assert old.last_error == f"cancelled: superseded by job {job2} before it was sent"


def test_a_job_finishing_while_the_current_draft_is_withdrawn_goes_with_it(
    node_db: NodeDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1 (read before a late instance) finishes at the moment job 2, the study's current
    draft, is withdrawn, in two transactions. Whichever commits first, job 1's draft must
    end withdrawn: taken by job 2's withdrawal, or by its own finish. Without the study's
    lock in the finish (PostgreSQL, READ COMMITTED) neither saw the other: the withdrawal
    found job 1 still running, the finish found job 2 not withdrawn, and job 1 became the
    study's current draft. (SQLite's BEGIN IMMEDIATE serializes them.)"""
    job1, job2 = _drafted_twice(node_db)
    with node_db.factory() as s:
        job = s.get_one(Job, job1)
        job.state, job.lease_owner = JobState.running, "w"  # still drafting
        s.commit()
    both = threading.Barrier(2)

    def meet() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            both.wait(timeout=2)  # both transactions under way, uncommitted

    drafts_by_sr, later_withdrawn = withdrawals_db._drafts_by_sr, withdrawals_db.later_withdrawn

    def drafts_read(*args: Any) -> Any:  # the withdrawal has read the study's drafts
        drafts = drafts_by_sr(*args)
        meet()
        return drafts

    def later_read(*args: Any) -> Any:  # the finish has read the newest later draft
        later = later_withdrawn(*args)
        meet()
        return later

    monkeypatch.setattr(withdrawals_db, "_drafts_by_sr", drafts_read)
    monkeypatch.setattr(withdrawals_db, "later_withdrawn", later_read)
    errors: list[BaseException] = []

    def run(work: Any) -> None:
        try:
            with node_db.factory() as s:
                work(s)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(
            target=run,
            args=(lambda s: withdrawals_db.withdraw_job(s, job2, actor="admin", reason="x"),),
        ),
        threading.Thread(
            target=run, args=(lambda s: withdrawals_db.finish_job(s, job1, owner="w"),)
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    with node_db.factory() as s:
        job = s.get_one(Job, job1)
        assert job.state is JobState.done and job.withdrawn_reason == "x"


def _drafting(db: NodeDB, job_id: int, *, attempts: int = 1, expired: bool = False) -> None:
    """Job ``job_id`` running under worker ``w`` (its lease passed when ``expired``)."""
    with db.factory() as s:
        job = s.get_one(Job, job_id)
        job.state, job.lease_owner, job.attempts = JobState.running, "w", attempts
        job.lease_expires_at = utcnow() + timedelta(minutes=-5 if expired else 5)
        s.commit()


def _claimed(db: NodeDB) -> list[int]:
    with db.factory() as s:
        return [c.id for c in deliveries_db.claim_due_deliveries(s, limit=20)]


def test_a_jobs_objects_wait_until_it_is_done(node_db: NodeDB) -> None:
    """A job queues its draft's objects just before it is marked done: a sender claims none
    of them before then (a job that fails or is cancelled meanwhile must send nothing, and
    one re-queued after a lost lease waits for its next run), and each of them after. A
    synthetic Secondary Capture, of no job, goes at once."""
    pacs = str(DESTS[0])
    job_id = make_job(node_db.factory)
    _drafting(node_db, job_id)
    with node_db.factory() as s:
        objects = [DeliveryObject.sr, DeliveryObject.pdf]
        ids = deliveries_db.enqueue_deliveries(
            s,
            job_id=job_id,
            items=[Outbound(pacs, o, f"/{o.value}") for o in objects],
            supersede=True,
            owner="w",
        )
        [sc] = deliveries_db.enqueue_deliveries(
            s, job_id=None, items=[Outbound(pacs, DeliveryObject.sc, "/sc.dcm")]
        )
    assert _claimed(node_db) == [sc]
    with node_db.factory() as s:
        withdrawals_db.finish_job(s, job_id, owner="w")
    assert _claimed(node_db) == ids


def test_a_job_cancelled_before_its_enqueue_queues_nothing(node_db: NodeDB) -> None:
    """The worker checked its lease, then an admin cancelled the job (or its last lease
    expired) before the worker queued the draft's objects: the enqueue, given the worker,
    refuses (``LeaseLost``), so no row of a cancelled job waits for ever."""
    job_id = make_job(node_db.factory)
    _drafting(node_db, job_id)
    with node_db.factory() as s:
        job_admin.cancel_job(s, job_id, actor="admin", reason="wrong patient")
        with pytest.raises(LeaseLost, match="does not hold its lease"):
            deliveries_db.enqueue_deliveries(
                s, job_id=job_id, sr_path="/1.dcm", destinations=DESTS, supersede=True, owner="w"
            )
    assert _rows(node_db, job_id) == []


def test_a_job_ending_without_a_draft_cancels_its_queued_rows(node_db: NodeDB) -> None:
    """A job that ends without a draft after it queued its objects has them cancelled, so
    that none waits for ever: its last lease expired (the worker died after the enqueue), a
    permanent error, an admin's cancel. A job re-queued with attempts left keeps them, and
    its next run queues the same rows again; they go once it is done."""
    pacs = str(DESTS[0])
    jobs = [make_job(node_db.factory) for _ in range(4)]
    lapsed, retried, broken, cancelled = jobs
    for job_id in jobs:
        _drafting(
            node_db,
            job_id,
            attempts=3 if job_id == lapsed else 1,
            expired=job_id in (lapsed, retried),
        )
    with node_db.factory() as s:
        rows = {
            j: deliveries_db.enqueue_deliveries(
                s, job_id=j, sr_path=f"/{j}.dcm", destinations=[pacs], supersede=True, owner="w"
            )[0]
            for j in jobs
        }
        assert s.get_one(Job, lapsed).max_attempts == 3
        assert jobs_db.expire_leases(s) == 2
        jobs_db.fail_job(s, broken, owner="w", error="SR could not be built", retry=False)
        job_admin.cancel_job(s, cancelled, actor="admin", reason="wrong patient")
    why = {
        lapsed: "cancelled: the job failed before it was sent",
        broken: "cancelled: the job failed before it was sent",
        cancelled: "cancelled: the job was cancelled before it was sent",
    }
    for job_id, ended in why.items():
        row = node_db.delivery(rows[job_id])
        assert (row.state, row.last_error) == (DeliveryState.cancelled, ended)
    assert node_db.delivery(rows[retried]).state is DeliveryState.pending
    with node_db.factory() as s:
        ended_events = {
            e.job_id: e.detail
            for e in s.scalars(select(JobEvent).where(JobEvent.kind.in_(["failed", "cancelled"])))
        }
        [entry] = s.scalars(select(AuditLog).where(AuditLog.action == "job.cancel"))
    assert {j: d["deliveries"] for j, d in ended_events.items()} == {j: [rows[j]] for j in why}
    assert entry.detail["deliveries"] == [rows[cancelled]]
    assert _claimed(node_db) == []  # the re-queued job's row waits for its next run
    with node_db.factory() as s:
        assert jobs_db.claim_next_job(s, owner="w2", lease_seconds=60) is not None
        assert deliveries_db.enqueue_deliveries(
            s, job_id=retried, sr_path="/again.dcm", destinations=[pacs], owner="w2"
        ) == [rows[retried]]
        withdrawals_db.finish_job(s, retried, owner="w2")
    assert _claimed(node_db) == [rows[retried]]


def test_a_later_draft_supersedes_the_earlier_only_once_it_is_done(node_db: NodeDB) -> None:
    """Job 1's draft (done) is still queued for the PACS when job 2, drafted again after a
    late instance, queues its own. Had job 2 cancelled job 1's row then, and then failed
    (its last lease expired after the enqueue), the PACS would get neither draft, though job
    1's is the study's current one, and a re-send skips a cancelled row. Job 1's row stays
    due until job 2 is done; job 2's finish cancels it (superseded), in its transaction."""
    pacs = str(DESTS[0])
    job1, job2 = _drafted_twice(node_db)
    job3 = _redraft(node_db, job1)
    for later in (job2, job3):
        _drafting(node_db, later, attempts=3, expired=later == job2)
    with node_db.factory() as s:
        assert s.get_one(Job, job2).max_attempts == 3
        [row1] = deliveries_db.enqueue_deliveries(
            s, job_id=job1, sr_path="/1.dcm", destinations=[pacs], supersede=True
        )
        for later in (job2, job3):
            deliveries_db.enqueue_deliveries(
                s,
                job_id=later,
                sr_path=f"/{later}.dcm",
                destinations=[pacs],
                supersede=True,
                owner="w",
            )
        assert jobs_db.expire_leases(s) == 1  # job 2 fails
    row = node_db.delivery(row1)
    assert (row.state, row.last_error) == (DeliveryState.pending, None)
    with node_db.factory() as s:
        assert deliveries_db.resend(s, job1, actor="admin") == [row1]
        withdrawals_db.finish_job(s, job3, owner="w")
    row = node_db.delivery(row1)
    assert (row.state, row.last_error) == (
        DeliveryState.cancelled,
        f"cancelled: superseded by job {job3} before it was sent",
    )


def test_an_earlier_job_finishing_after_a_withdrawal_keeps_what_a_standing_draft_left(
    node_db: NodeDB,
) -> None:
    """Job 1 (read before the late instances) has queued its draft to the PACS and the
    STOW-RS server when job 2, the study's current draft, is withdrawn; job 3, later still,
    is done and goes to the PACS only. Job 1 then finishes: job 3's draft stands, so job 1's
    is not withdrawn; it is superseded at the PACS, and still goes to the STOW-RS server,
    which no later draft reached (as for any earlier draft)."""
    pacs, stow = (str(d) for d in DESTS)
    job1, job2 = _drafted_twice(node_db)
    _drafting(node_db, job1)
    with node_db.factory() as s:
        ids = deliveries_db.enqueue_deliveries(
            s, job_id=job1, sr_path="/1.dcm", destinations=[pacs, stow], supersede=True, owner="w"
        )
        withdrawals_db.withdraw_job(s, job2, actor="admin", reason="wrong side")
        job3 = add_redraft(
            s, job1, "IMPRESSION: latest.", at=utcnow(), sr_sop_instance_uid="2.25.3"
        )
        s.commit()
        deliveries_db.enqueue_deliveries(
            s, job_id=job3.id, sr_path="/3.dcm", destinations=[pacs], supersede=True
        )
        assert withdrawals_db.finish_job(s, job1, owner="w") is None
    states = {node_db.delivery(i).destination: node_db.delivery(i) for i in ids}
    assert states[pacs].last_error == f"cancelled: superseded by job {job3.id} before it was sent"
    assert (states[stow].state, states[stow].last_error) == (DeliveryState.pending, None)
    assert _claimed(node_db) == [states[stow].id, *(r.id for r in _rows(node_db, job3.id))]


def test_a_rerun_cancels_its_earlier_runs_rows_it_does_not_queue_again(node_db: NodeDB) -> None:
    """Job 2's first run queued its draft to the PACS and the STOW-RS server, then lost its
    lease; its next run is routed to the PACS only (the rules changed). The STOW-RS row,
    with the first run's file, must not go out once the job is done, and job 2's draft did
    not replace job 1's there: the run's enqueue cancels it, and job 2's finish supersedes
    job 1 at the PACS only."""
    pacs, stow = (str(d) for d in DESTS)
    job1, job2 = _drafted_twice(node_db)
    _drafting(node_db, job2)
    with node_db.factory() as s:
        older = deliveries_db.enqueue_deliveries(
            s, job_id=job1, sr_path="/1.dcm", destinations=[pacs, stow], supersede=True
        )
        _, first_stow = deliveries_db.enqueue_deliveries(
            s, job_id=job2, sr_path="/run1.dcm", destinations=[pacs, stow], owner="w"
        )
        s.get_one(Job, job2).lease_owner = "w2"  # the lease passed to another worker
        s.commit()
        [again] = deliveries_db.enqueue_deliveries(
            s, job_id=job2, sr_path="/run2.dcm", destinations=[pacs], supersede=True, owner="w2"
        )
        withdrawals_db.finish_job(s, job2, owner="w2")
    row = node_db.delivery(first_stow)
    assert (row.state, row.last_error) == (
        DeliveryState.cancelled,
        "cancelled: not queued again by the job's last run",
    )
    to_pacs, to_stow = (node_db.delivery(i) for i in older)
    assert to_pacs.last_error == f"cancelled: superseded by job {job2} before it was sent"
    assert (to_stow.state, to_stow.last_error) == (DeliveryState.pending, None)
    assert _claimed(node_db) == sorted([to_stow.id, again])


def test_a_later_result_cancels_an_earlier_drafts_hl7_withdrawal_not_yet_sent(
    node_db: NodeDB,
) -> None:
    """Job 1's ORU^R01 and SR reached the RIS and the PACS; job 2, drafted again after a
    late instance, has queued its own and is not done when job 1 is withdrawn, so job 1's
    withdrawals are queued (OBR-25 ``C`` for the order, a rejection note), and the RIS
    answers the first attempt with an error. Sent (again) after job 2's result, the HL7 one
    would mark the order's newer result wrong, which replaces the withdrawn one anyway: job
    2's finish cancels it. The PACS keeps each draft apart: its note stays. Job 2 withdrawn
    in turn before its ORU^R01 went out, job 1's withdrawal to the RIS is queued again."""
    ris, pacs = str(Hl7Destination(host="127.0.0.1", port=2575)), str(DESTS[0])
    job1, job2 = _drafted_twice(node_db)
    _drafting(node_db, job2)
    with node_db.factory() as s:
        drafts = deliveries_db.enqueue_deliveries(
            s,
            job_id=job1,
            items=[
                Outbound(ris, DeliveryObject.report, "/1.hl7"),
                Outbound(pacs, DeliveryObject.sr, "/1.dcm"),
            ],
            supersede=True,
        )
        for claimed in deliveries_db.claim_due_deliveries(s, limit=10):
            assert deliveries_db.mark_sent(s, claimed.id, claimed_until=claimed.next_attempt_at)
        deliveries_db.enqueue_deliveries(
            s,
            job_id=job2,
            items=[
                Outbound(ris, DeliveryObject.report, "/2.hl7"),
                Outbound(pacs, DeliveryObject.sr, "/2.dcm"),
            ],
            supersede=True,
            owner="w",
        )
        done = withdrawals_db.withdraw_job(s, job1, actor="admin", reason="wrong side")
        assert sorted(done.reached) == sorted([ris, pacs])  # job 2 is not done: not skipped
        to_ris, to_pacs = deliveries_db.enqueue_deliveries(
            s,
            job_id=job1,
            items=[
                Outbound(ris, DeliveryObject.withdrawal, "/w1.hl7"),
                Outbound(pacs, DeliveryObject.withdrawal, "/w1.dcm"),
            ],
        )
        for claimed in deliveries_db.claim_due_deliveries(s, limit=10):  # job 1's only
            assert claimed.id in (to_ris, to_pacs)
            assert deliveries_db.mark_retry(
                s,
                claimed.id,
                error="AE: application error",
                next_attempt_at=utcnow() + timedelta(minutes=1),
                claimed_until=claimed.next_attempt_at,
            )
        withdrawals_db.finish_job(s, job2, owner="w")
    row = node_db.delivery(to_ris)
    assert (row.state, row.last_error) == (
        DeliveryState.cancelled,
        f"cancelled: job {job2}'s result replaces the order's before it was sent",
    )
    assert node_db.delivery(to_pacs).state is DeliveryState.pending
    assert {node_db.delivery(i).state for i in drafts} == {DeliveryState.sent}

    # job 2 is withdrawn too before its ORU^R01 went out: job 1's result is still the
    # order's at the RIS, and its withdrawal is queued again
    with node_db.factory() as s:
        done = withdrawals_db.withdraw_job(s, job2, actor="admin", reason="wrong side")
        [entry] = s.scalars(
            select(AuditLog).where(
                AuditLog.action == "job.withdraw", AuditLog.target == f"job:{job2}"
            )
        )
    assert done.reached == {} and entry.detail["restored"] == [to_ris]
    row = node_db.delivery(to_ris)
    # it resumes the round it was held back in: its attempt, due at the retry it waited
    # for (a row cannot tell that time from a claim's end: a send may be under way)
    assert (row.state, row.last_error, row.attempts) == (DeliveryState.pending, None, 1)
    assert row.may_have_reached  # its first attempt may have arrived
    assert row.next_attempt_at is not None and row.next_attempt_at > utcnow()
    assert to_ris not in _claimed(node_db)
    with node_db.factory() as s:
        due = deliveries_db.claim_due_deliveries(s, now=row.next_attempt_at, limit=10)
    assert to_ris in [c.id for c in due]


@pytest.mark.parametrize("end", ["expire", "fail", "cancel"])
def test_an_earlier_job_ending_while_a_later_one_finishes_does_not_deadlock(
    node_db: NodeDB, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """Job 1 ends without a draft (its last lease expires, a permanent error, an admin's
    cancel) while job 2, later, of the same study, is marked done. The ending locks job 1's
    rows (to cancel them), then writes job 1 again (its error): in one transaction the key
    of a row written twice is checked again, ``FOR KEY SHARE`` on the study. The finish
    locks the study, then job 1's rows (to supersede them). With the study locked ``FOR
    UPDATE`` (PostgreSQL) each waited for the other."""
    pacs = str(DESTS[0])
    job1, job2 = _drafted_twice(node_db)
    for job_id in (job1, job2):
        _drafting(node_db, job_id, attempts=3, expired=job_id == job1 and end == "expire")
    with node_db.factory() as s:
        assert s.get_one(Job, job1).max_attempts == 3
        for job_id in (job1, job2):
            deliveries_db.enqueue_deliveries(
                s, job_id=job_id, sr_path=f"/{job_id}.dcm", destinations=[pacs], owner="w"
            )
    cancel_unsent, locked = jobs_db.cancel_unsent, threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:  # job 1's rows locked, its error not written
        rows = cancel_unsent(*args, **kwargs)
        locked.set()
        time.sleep(1.0)
        return rows

    monkeypatch.setattr(jobs_db, "cancel_unsent", held)
    errors: list[BaseException] = []

    def ending() -> None:
        try:
            with node_db.factory() as s:
                if end == "expire":
                    jobs_db.expire_leases(s)
                elif end == "fail":
                    jobs_db.fail_job(s, job1, owner="w", error="SR could not be built", retry=False)
                else:
                    job_admin.cancel_job(s, job1, actor="admin", reason="wrong patient")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=ending)
    thread.start()
    assert locked.wait(10)
    with node_db.factory() as s:
        withdrawals_db.finish_job(s, job2, owner="w")
    thread.join(timeout=30)
    assert errors == [] and not thread.is_alive()
    [row1] = _rows(node_db, job1)
    assert row1.state is DeliveryState.cancelled  # by the ending, which came first
    with node_db.factory() as s:
        ended = s.get_one(Job, job1).state
    assert ended is (JobState.cancelled if end == "cancel" else JobState.failed)


def test_destination_health_per_destination(node_db: NodeDB) -> None:
    """Each destination's counts, newest success and newest unsent failure, from rows of
    several jobs; a destination with no rows reads as empty, and one's rows never leak into
    another's."""
    pacs, stow, idle = "PACS@127.0.0.1:104", "http://127.0.0.1:8042/dicom-web", "IDLE@h:11112"
    t0 = utcnow().replace(microsecond=0)

    def row(dest: str, state: DeliveryState, **kw: object) -> Delivery:
        kind = DeliveryKind.stow if dest.startswith("http") else DeliveryKind.dimse
        job_id = make_job(node_db.factory)
        return Delivery(
            job_id=job_id, destination=dest, kind=kind, state=state, created_at=t0, **kw
        )

    with node_db.factory() as s:
        s.add_all(
            [
                row(pacs, DeliveryState.sent, sent_at=t0 - timedelta(hours=2)),
                row(pacs, DeliveryState.sent, sent_at=t0 - timedelta(hours=1)),
                row(pacs, DeliveryState.failed, last_error="old refusal"),
                # the newest failure is still retrying
                row(
                    pacs,
                    DeliveryState.pending,
                    last_error="cannot connect",
                    next_attempt_at=t0 + timedelta(minutes=5),
                ),
                # a sent row keeps the error of an earlier attempt: not a failure
                row(
                    pacs, DeliveryState.sent, last_error="was down", sent_at=t0 - timedelta(days=1)
                ),
                # cancelled by a withdrawal after the retrying row: not the destination's
                # failure, and it does not hide the retrying one
                row(
                    pacs,
                    DeliveryState.cancelled,
                    last_error="cancelled: the draft was withdrawn before it was sent",
                ),
                row(stow, DeliveryState.failed, last_error="HTTP 400"),
                row(stow, DeliveryState.pending),
            ]
        )
        s.commit()
    with node_db.factory() as s:
        health = delivery_views.destination_health(s, [pacs, stow, idle])
        assert delivery_views.destination_health(s, []) == {}
    assert list(health) == [pacs, stow, idle]
    p, st, i = health[pacs], health[stow], health[idle]
    assert p.counts == {"pending": 1, "sent": 3, "failed": 1, "cancelled": 1}
    assert p.last_success_at is not None and p.last_success_at.replace(tzinfo=None) == (
        t0 - timedelta(hours=1)
    ).replace(tzinfo=None)
    assert (p.failure_state, p.last_error) == ("pending", "cannot connect")
    assert p.retry_at is not None and p.failure_queued_at is not None
    assert p.retry_at.replace(tzinfo=None) == (t0 + timedelta(minutes=5)).replace(tzinfo=None)
    assert p.failure_queued_at.replace(tzinfo=None) == t0.replace(tzinfo=None)
    assert st.counts == {"pending": 1, "sent": 0, "failed": 1, "cancelled": 0}
    assert st.last_success_at is None
    assert (st.failure_state, st.last_error, st.retry_at) == ("failed", "HTTP 400", None)
    assert i.counts == {"pending": 0, "sent": 0, "failed": 0, "cancelled": 0}
    assert (i.last_success_at, i.failure_state, i.last_error) == (None, None, None)


def test_job_delivery_state_shown_is_the_one_filtered(node_db: NodeDB) -> None:
    """A job's delivery state in the list is the ``delivery=`` filter that lists it, for
    each mix of its rows' states. A row ``cancelled`` by a withdrawal was never sent and
    never will be: it does not make the job look still to be delivered."""
    mixes: dict[str, tuple[DeliveryState, ...]] = {
        "nothing queued": (),
        "sent": (DeliveryState.sent,),
        "one to go": (DeliveryState.sent, DeliveryState.pending),
        "one failed": (DeliveryState.sent, DeliveryState.failed, DeliveryState.pending),
        # withdrawn after the SR was sent: the PDF's row cancelled, the withdrawal sent
        "withdrawn, sent": (DeliveryState.sent, DeliveryState.cancelled, DeliveryState.sent),
        # withdrawn with the withdrawal still queued
        "withdrawal to go": (DeliveryState.sent, DeliveryState.cancelled, DeliveryState.pending),
        # withdrawn before anything was sent
        "withdrawn, unsent": (DeliveryState.cancelled, DeliveryState.cancelled),
    }
    expected = {
        "nothing queued": "none",
        "sent": "sent",
        "one to go": "pending",
        "one failed": "failed",
        "withdrawn, sent": "sent",
        "withdrawal to go": "pending",
        "withdrawn, unsent": "none",
    }
    jobs = {name: make_job(node_db.factory) for name in mixes}
    with node_db.factory() as s:
        for name, states in mixes.items():
            for n, state in enumerate(states):
                s.add(
                    Delivery(
                        job_id=jobs[name],
                        destination=f"PACS{n}@127.0.0.1:104",
                        kind=DeliveryKind.dimse,
                        state=state,
                        created_at=utcnow(),
                    )
                )
        s.commit()
    names = {job_id: name for name, job_id in jobs.items()}
    with node_db.factory() as s:
        rows, _ = job_list.filter_jobs(s, job_list.JobFilter(limit=1000))
        shown = {names[r.id]: r.delivery_state for r in rows if r.id in names}
        listed = {
            state: {
                names[r.id]
                for r in job_list.filter_jobs(s, job_list.JobFilter(delivery=state, limit=1000))[0]
                if r.id in names
            }
            for state in job_list.DELIVERY_STATES
        }
    assert shown == expected
    assert listed == {
        state: {name for name, want in expected.items() if want == state}
        for state in job_list.DELIVERY_STATES
    }
