"""A cancelled row's send that may still be under way (node.db.delivery_claims), on SQLite
and PostgreSQL.

A row cancelled while a sender holds its claim loses the claim, but the send goes on and
may reach the receiver. Nothing of the study queued for that destination after it may
overtake it there: a withdrawal arriving before the draft it withdraws (IHE IOCM: a
rejection note before the instance it rejects) would leave the withdrawn draft standing,
and a newer draft arriving before the older one would leave the older one as the current
one (an HL7 withdrawal held back by a later result, sent after that result, would mark it
wrong). Such rows wait until the cancelled send ends or its claim would have.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from node.db import deliveries as deliveries_db
from node.db import views
from node.db import withdrawals as withdrawals_db
from node.db.deliveries import Outbound
from node.db.models import DeliveryObject, DeliveryState, Job, utcnow
from node.settings import DicomDestination, Hl7Destination
from tests.delivery.conftest import NodeDB, make_job
from tests.delivery.test_repo_delivery import _claimed, _drafted_twice, _redraft

PACS = str(DicomDestination(ae_title="PACS", host="127.0.0.1", port=104))
VNA = str(DicomDestination(ae_title="VNA", host="127.0.0.1", port=105))
RIS = str(Hl7Destination(host="127.0.0.1", port=2575))


def _queue(db: NodeDB, job_id: int | None, *items: Outbound, supersede: bool = False) -> list[int]:
    with db.factory() as s:
        return deliveries_db.enqueue_deliveries(
            s, job_id=job_id, items=list(items), supersede=supersede
        )


def _claim(db: NodeDB, now: datetime | None = None) -> dict[int, datetime]:
    """Claim the due rows: ``{id: the claim's end}``."""
    with db.factory() as s:
        return {
            c.id: c.next_attempt_at
            for c in deliveries_db.claim_due_deliveries(s, now=now, limit=20)
            if c.next_attempt_at is not None
        }


def _held_under_way(db: NodeDB) -> tuple[int, int, int, int, datetime]:
    """Job 1's ORU^R01 reached the RIS, job 1 is withdrawn, and its withdrawal is being sent
    when job 2, drafted after a late instance, queues its own result, which holds the
    withdrawal back as it goes: ``(job 1, job 2, the withdrawal, job 2's result, the
    claim's end)``."""
    job1, job2 = _drafted_twice(db)
    [result1] = _queue(db, job1, Outbound(RIS, DeliveryObject.report, "/1.hl7"))
    with db.factory() as s:
        assert deliveries_db.mark_sent(s, result1, claimed_until=_claim(db)[result1])
        withdrawals_db.withdraw_job(s, job1, actor="admin", reason="wrong side")
    [withdrawal] = _queue(db, job1, Outbound(RIS, DeliveryObject.withdrawal, "/1w.hl7"))
    lease = _claim(db)[withdrawal]
    [result2] = _queue(db, job2, Outbound(RIS, DeliveryObject.report, "/2.hl7"), supersede=True)
    return job1, job2, withdrawal, result2, lease


def _restored_under_way(db: NodeDB) -> tuple[int, int, int, datetime]:
    """:func:`_held_under_way`, then job 2 withdrawn before its result went out: job 1's
    withdrawal is queued again. ``(job 1, job 2, the withdrawal, its first send's claim's
    end)``."""
    job1, job2, withdrawal, _result2, lease = _held_under_way(db)
    with db.factory() as s:
        withdrawals_db.withdraw_job(s, job2, actor="admin", reason="wrong study")
    return job1, job2, withdrawal, lease


@pytest.mark.parametrize("ends", ["reported", "lease passes"])
def test_a_withdrawal_waits_for_the_send_of_the_draft_it_withdraws(
    node_db: NodeDB, ends: str
) -> None:
    """The draft SR is being sent to the PACS when an admin withdraws it: the SR's row is
    cancelled and keeps its claim's end, and the withdrawal's KOS to the PACS is not claimed
    while that send may go on; the study's rows to another destination, another study's
    and a Secondary Capture of no study go at once. The KOS goes once the send reports (its
    result not recorded: the claim was lost) or its claim's end passes. The job's page
    shows no next attempt for the cancelled row."""
    job, other = make_job(node_db.factory), make_job(node_db.factory)
    with node_db.factory() as s:
        s.get_one(Job, job).sr_sop_instance_uid = "2.25.1"
        s.commit()
    [sr] = _queue(node_db, job, Outbound(PACS, DeliveryObject.sr, "/sr.dcm"))
    [vna_sr] = _queue(node_db, job, Outbound(VNA, DeliveryObject.sr, "/sr.dcm"))
    lease = _claim(node_db)
    assert set(lease) == {sr, vna_sr}
    with node_db.factory() as s:  # the VNA has it; the PACS send goes on
        assert deliveries_db.mark_sent(s, vna_sr, claimed_until=lease[vna_sr])
        withdrawals_db.withdraw_job(s, job, actor="admin", reason="wrong patient")
    row = node_db.delivery(sr)
    assert (row.state, row.next_attempt_at) == (DeliveryState.cancelled, lease[sr])
    with node_db.factory() as s:
        listed = {d.id: d for d in views.job_detail(s, job).deliveries}
    assert listed[sr].state == "cancelled" and listed[sr].next_attempt_at is None

    [kos] = _queue(node_db, job, Outbound(PACS, DeliveryObject.withdrawal, "/kos.dcm"))
    [vna_kos] = _queue(node_db, job, Outbound(VNA, DeliveryObject.withdrawal, "/kos.dcm"))
    [theirs] = _queue(node_db, other, Outbound(PACS, DeliveryObject.sr, "/o.dcm"))
    [sc] = _queue(node_db, None, Outbound(PACS, DeliveryObject.sc, "/sc.dcm"))
    assert _claimed(node_db) == [vna_kos, theirs, sc]

    if ends == "reported":
        with node_db.factory() as s:
            assert not deliveries_db.mark_sent(s, sr, claimed_until=lease[sr])
        row = node_db.delivery(sr)
        assert (row.state, row.next_attempt_at) == (DeliveryState.cancelled, None)
        assert list(_claim(node_db)) == [kos]
    else:
        assert _claim(node_db, now=lease[sr] - timedelta(seconds=1)) == {}
        assert list(_claim(node_db, now=lease[sr])) == [kos]


def test_a_later_result_waits_for_the_held_back_withdrawal_under_way(node_db: NodeDB) -> None:
    """Job 1's ORU^R01 reached the RIS, job 1 is withdrawn, and its withdrawal is being sent
    when job 2, drafted after a late instance, queues its own result: the withdrawal is held
    back (cancelled) as it goes, and job 2's result is not claimed before that send may end.
    Sent after it, the withdrawal would mark job 2's result, the order's now, wrong (HL7
    v2.5.1 section 7.4.1)."""
    _job1, _job2, withdrawal, result2, lease = _held_under_way(node_db)
    row = node_db.delivery(withdrawal)
    assert (row.state, row.next_attempt_at) == (DeliveryState.cancelled, lease)
    assert _claim(node_db, now=lease - timedelta(seconds=1)) == {}
    assert list(_claim(node_db, now=lease)) == [result2]


def test_a_newer_draft_waits_for_a_cancelled_row_waiting_for_a_retry(node_db: NodeDB) -> None:
    """A row cannot tell a send under way from a wait for a retry: job 1's SR, refused for
    now and due again later, is superseded by job 2's, which waits until then (at most the
    longest backoff). A row of job 1 never attempted keeps no time, and delays nothing."""
    job1, job2 = _drafted_twice(node_db)
    [sr1] = _queue(node_db, job1, Outbound(PACS, DeliveryObject.sr, "/1.dcm"))
    [pdf1] = _queue(node_db, job1, Outbound(VNA, DeliveryObject.pdf, "/1.pdf"))
    due = utcnow() + timedelta(seconds=60)  # before the other claims' leases end
    with node_db.factory() as s:
        lease = {c.id: c.next_attempt_at for c in deliveries_db.claim_due_deliveries(s, limit=1)}
        assert deliveries_db.mark_retry(
            s, sr1, error="association rejected", next_attempt_at=due, claimed_until=lease[sr1]
        )
    sr2, pdf2 = _queue(
        node_db,
        job2,
        Outbound(PACS, DeliveryObject.sr, "/2.dcm"),
        Outbound(VNA, DeliveryObject.pdf, "/2.pdf"),
        supersede=True,
    )
    assert node_db.delivery(sr1).next_attempt_at == due
    assert (node_db.delivery(pdf1).state, node_db.delivery(pdf1).next_attempt_at) == (
        DeliveryState.cancelled,
        None,
    )
    assert list(_claim(node_db)) == [pdf2]
    assert list(_claim(node_db, now=due)) == [sr2]


@pytest.mark.parametrize("then", ["withdrawn", "superseded"])
def test_a_job_resend_leaves_the_row_being_sent_to_its_send(node_db: NodeDB, then: str) -> None:
    """An admin re-sends job 1 while its SR is being sent to a slow PACS: the SR's row is
    left to that send (sent again at once, it would go twice, and lose its fence), so when
    job 1 is then withdrawn, or superseded by job 2, the row keeps its claim's end, and the
    withdrawal's KOS or job 2's SR waits for it."""
    job1, job2 = _drafted_twice(node_db)
    [sr1] = _queue(node_db, job1, Outbound(PACS, DeliveryObject.sr, "/1.dcm"))
    lease = _claim(node_db)[sr1]
    with node_db.factory() as s:
        assert deliveries_db.resend(s, job1, actor="admin") == []
    assert (node_db.delivery(sr1).attempts, node_db.delivery(sr1).next_attempt_at) == (1, lease)
    if then == "withdrawn":
        with node_db.factory() as s:
            withdrawals_db.withdraw_job(s, job1, actor="admin", reason="wrong patient")
        [after] = _queue(node_db, job1, Outbound(PACS, DeliveryObject.withdrawal, "/kos.dcm"))
    else:
        [after] = _queue(node_db, job2, Outbound(PACS, DeliveryObject.sr, "/2.dcm"), supersede=True)
    assert node_db.delivery(sr1).next_attempt_at == lease
    assert _claim(node_db) == {}
    assert list(_claim(node_db, now=lease)) == [after]


def test_a_withdrawal_restored_waits_for_its_own_send_under_way(node_db: NodeDB) -> None:
    """Job 1's HL7 withdrawal is being sent when job 2's result holds it back; job 2 is then
    withdrawn before its result went out, so job 1's withdrawal is queued again. It resumes
    that round (its attempt and horizon), due when its claim ends: not twice at once, nor
    again by a re-send of job 1 meanwhile. Held back again by job 3's result, it keeps that
    time, and job 3's result waits for it."""
    job1, job2, withdrawal, lease = _restored_under_way(node_db)
    row = node_db.delivery(withdrawal)
    assert (row.state, row.attempts, row.next_attempt_at) == (DeliveryState.pending, 1, lease)
    assert row.queued_at == row.created_at
    assert _claim(node_db) == {}
    with node_db.factory() as s:
        assert deliveries_db.resend(s, job1, actor="admin") == []
    assert node_db.delivery(withdrawal).next_attempt_at == lease

    job3 = _redraft(node_db, job2)
    [result3] = _queue(
        node_db, job3, Outbound(RIS, DeliveryObject.report, "/3.hl7"), supersede=True
    )
    row = node_db.delivery(withdrawal)
    assert (row.state, row.next_attempt_at) == (DeliveryState.cancelled, lease)
    assert _claim(node_db) == {}
    assert list(_claim(node_db, now=lease)) == [result3]


@pytest.mark.parametrize("outcome", ["sent", "retry", "gave up"])
def test_the_send_under_way_records_its_outcome_on_the_withdrawal_restored(
    node_db: NodeDB, outcome: str
) -> None:
    """The first send of a withdrawal restored while it went on reports, as its round's
    outcome: it got there (``sent``, not sent twice); no answer, again later (``pending``,
    its one attempt counted); or its horizon passed (``failed`` after its one attempt, for
    the re-check to queue again when the RIS answers)."""
    _job1, _job2, withdrawal, lease = _restored_under_way(node_db)
    later = lease + timedelta(seconds=30)
    with node_db.factory() as s:
        if outcome == "sent":
            assert deliveries_db.mark_sent(s, withdrawal, claimed_until=lease)
        elif outcome == "retry":
            assert deliveries_db.mark_retry(
                s, withdrawal, error="no ACK", next_attempt_at=later, claimed_until=lease
            )
        else:
            assert deliveries_db.mark_failed(s, withdrawal, error="gave up", claimed_until=lease)
    row = node_db.delivery(withdrawal)
    expected = {
        "sent": (DeliveryState.sent, 1, None),
        "retry": (DeliveryState.pending, 1, later),
        "gave up": (DeliveryState.failed, 1, None),
    }[outcome]
    assert (row.state, row.attempts, row.next_attempt_at) == expected
    assert _claim(node_db, now=lease) == {}
