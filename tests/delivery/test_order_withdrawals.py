"""HL7 withdrawals held back by a later draft's result (node.db.superseded), on SQLite and
PostgreSQL.

HL7 v2 results are the order's: an earlier draft's withdrawal (OBR-25 ``C``, OBX-11 ``W``)
sent after a later draft's ORU^R01 would mark the newer result wrong. It is held back
(``cancelled``) while a later result replaces it at the RIS or will, and queued again once
none will: the later draft withdrawn before it went out, or its ORU^R01 refused for good.
Job 1 is the earlier draft (A), job 2 the later one (L), job 3 a later one still (M).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from node.db import deliveries as deliveries_db
from node.db import delivery_resends
from node.db import withdrawals as withdrawals_db
from node.db.deliveries import Outbound
from node.db.models import AuditLog, DeliveryObject, DeliveryState, utcnow
from node.db.superseded import order_replaced
from node.settings import Hl7Destination
from tests.delivery.conftest import NodeDB
from tests.delivery.test_repo_delivery import _claimed, _drafted_twice
from tests.node.factories import add_redraft

RIS = str(Hl7Destination(host="127.0.0.1", port=2575))
REPORT, WITHDRAWAL = DeliveryObject.report, DeliveryObject.withdrawal


def _holding(job_id: int) -> str:
    return f"cancelled: job {job_id}'s result replaces the order's before it was sent"


def _third(db: NodeDB, job1: int) -> int:
    """A third done job of job ``job1``'s study, later than the others."""
    with db.factory() as s:
        job = add_redraft(s, job1, "IMPRESSION: latest.", at=utcnow(), sr_sop_instance_uid="2.25.3")
        s.commit()
        return job.id


def _queue(db: NodeDB, job_id: int, obj: DeliveryObject = REPORT) -> int:
    """Queue job ``job_id``'s result (as its draft) or withdrawal to the RIS; its row."""
    with db.factory() as s:
        [row] = deliveries_db.enqueue_deliveries(
            s,
            job_id=job_id,
            items=[Outbound(RIS, obj, f"/{job_id}.{obj.value}.hl7")],
            supersede=obj is REPORT,
        )
    return row


def _send(db: NodeDB, row_id: int, outcome: str) -> None:
    """Claim the due rows and record ``outcome`` for ``row_id``: ``sent``, ``refused`` (a
    permanent failure), ``failed`` (its horizon passed) or ``retry`` (no answer, again soon)."""
    with db.factory() as s:
        claims = {c.id: c.next_attempt_at for c in deliveries_db.claim_due_deliveries(s, limit=20)}
        until = claims[row_id]
        if outcome == "sent":
            assert deliveries_db.mark_sent(s, row_id, claimed_until=until)
        elif outcome == "retry":
            assert deliveries_db.mark_retry(
                s,
                row_id,
                error="no ACK within 30 s",
                next_attempt_at=utcnow() - timedelta(seconds=1),
                claimed_until=until,
            )
        else:
            assert deliveries_db.mark_failed(
                s, row_id, error="AE: 100", claimed_until=until, permanent=outcome == "refused"
            )


def _withdraw_first(db: NodeDB, job1: int) -> int:
    """Withdraw job ``job1``'s draft and queue its withdrawal to the RIS; the row."""
    with db.factory() as s:
        withdrawals_db.withdraw_job(s, job1, actor="admin", reason="wrong side")
    return _queue(db, job1, WITHDRAWAL)


def _state(db: NodeDB, row_id: int) -> tuple[DeliveryState, str | None]:
    row = db.delivery(row_id)
    return row.state, row.last_error


@pytest.mark.parametrize("outcome", ["refused", "failed", "sent"])
def test_a_withdrawal_held_back_by_a_later_result_goes_out_if_the_ris_refuses_it(
    node_db: NodeDB, outcome: str
) -> None:
    """Job 1's ORU^R01 reached the RIS; job 2, drafted after a late instance, is done and
    its own is queued, not sent, when job 1 is withdrawn. Job 1's withdrawal to the RIS is
    queued held back. When the RIS refuses job 2's ORU^R01 for good, job 1's result is
    still the order's there, and the withdrawal is queued again (audited
    ``delivery.restore``); when job 2's is sent, or fails for now (a re-check sends it
    again), it stays held back. An admin's re-send of job 2's refused result holds it back
    again while it is not sent."""
    job1, job2 = _drafted_twice(node_db)
    _send(node_db, _queue(node_db, job1), "sent")
    result2 = _queue(node_db, job2)
    held = _withdraw_first(node_db, job1)
    with node_db.factory() as s:
        [entry] = s.scalars(
            select(AuditLog).where(
                AuditLog.action == "delivery.supersede", AuditLog.target == f"job:{job2}"
            )
        )
    assert entry.detail == {"cancelled": [held], "jobs": [job1]}
    assert _state(node_db, held) == (DeliveryState.cancelled, _holding(job2))

    _send(node_db, result2, outcome)
    with node_db.factory() as s:
        entries = list(s.scalars(select(AuditLog).where(AuditLog.action == "delivery.restore")))
    if outcome != "refused":
        assert (*_state(node_db, held), entries) == (DeliveryState.cancelled, _holding(job2), [])
        assert _claimed(node_db) == []
        return
    assert [(e.target, e.detail) for e in entries] == [
        (f"job:{job2}", {"refused": result2, "restored": [held]})
    ]
    row = node_db.delivery(held)
    assert (row.state, row.last_error, row.attempts) == (DeliveryState.pending, None, 0)

    # the cause fixed, an admin sends job 2's result again: the withdrawal, not sent, waits
    with node_db.factory() as s:
        assert deliveries_db.resend_deliveries(s, actor="admin", ids=[result2]) == [result2]
    assert _state(node_db, held) == (DeliveryState.cancelled, _holding(job2))
    assert _claimed(node_db) == [result2]


def test_a_refused_result_a_still_later_draft_superseded_replaces_nothing(
    node_db: NodeDB,
) -> None:
    """Job 2's result was refused for good, so job 1's withdrawal goes to the RIS; job 3,
    done later, holds it back again (and cancels job 2's refused row, superseded). Job 2's
    result is not at the RIS for being cancelled: when the RIS refuses job 3's too, job 1's
    withdrawn result is still the order's, and the withdrawal goes out. A withdrawal of job
    1 made only then is not skipped for job 2's row either: nothing replaced job 1's
    result."""
    job1, job2 = _drafted_twice(node_db)
    job3 = _third(node_db, job1)
    _send(node_db, _queue(node_db, job1), "sent")
    result2 = _queue(node_db, job2)
    _send(node_db, result2, "refused")
    result3 = _queue(node_db, job3)
    assert node_db.delivery(result2).state is DeliveryState.cancelled
    with node_db.factory() as s:
        assert order_replaced(s, job1, [RIS]) == {}
    held = _withdraw_first(node_db, job1)
    assert _state(node_db, held) == (DeliveryState.cancelled, _holding(job3))
    _send(node_db, result3, "refused")
    assert node_db.delivery(held).state is DeliveryState.pending
    assert _claimed(node_db) == [held]


@pytest.mark.parametrize("before", ["sent", "retry", "failed", "lapsed"])
def test_a_refusal_of_a_result_the_ris_may_hold_queues_no_withdrawal(
    node_db: NodeDB, before: str
) -> None:
    """Job 1's withdrawal is held back by job 2's result, which the RIS may hold when it
    refuses a later attempt of it: the result was sent, then sent again by an admin, and
    the RIS refuses the copy (a duplicate MSH-10); its first attempt got no answer and
    the RIS refuses the retry; its first attempt got no answer at its horizon (``failed``
    for now) and the re-check queued it again; or the sender's claim lapsed without an
    outcome recorded (it died after the RIS filed it) and the RIS refuses the next
    attempt. Job 1's OBX-11 ``W`` would mark that result wrong: the withdrawal stays
    back."""
    job1, job2 = _drafted_twice(node_db)
    _send(node_db, _queue(node_db, job1), "sent")
    result2 = _queue(node_db, job2)
    held = _withdraw_first(node_db, job1)
    if before == "lapsed":
        with node_db.factory() as s:
            [claimed] = deliveries_db.claim_due_deliveries(s, lease_seconds=60)
            assert claimed.id == result2  # sent and filed, its outcome never recorded
            [again] = deliveries_db.claim_due_deliveries(s, now=utcnow() + timedelta(minutes=2))
            assert (again.id, again.attempts) == (result2, 2)
            assert deliveries_db.mark_failed(
                s, result2, error="AE: 100", claimed_until=again.next_attempt_at, permanent=True
            )
    else:
        _send(node_db, result2, before)
        with node_db.factory() as s:
            if before == "sent":
                assert deliveries_db.resend_deliveries(s, actor="admin", ids=[result2]) == [result2]
            elif before == "failed":
                assert deliveries_db.requeue_failed(s, RIS, reason="it answers") == [result2]
        _send(node_db, result2, "refused")
    assert _state(node_db, held) == (DeliveryState.cancelled, _holding(job2))
    with node_db.factory() as s:
        assert list(s.scalars(select(AuditLog).where(AuditLog.action == "delivery.restore"))) == []
    assert _claimed(node_db) == []


def test_a_resend_answers_only_the_rows_it_leaves_queued(node_db: NodeDB) -> None:
    """Job 2's result was refused for good, so job 1's withdrawal went out and failed for
    now (its horizon passed). The admin re-sends every failed row of the RIS: job 2's
    result goes again, which holds job 1's withdrawal back in the same transaction. The
    answer and the ``delivery.resend`` entries name only job 2's row."""
    job1, job2 = _drafted_twice(node_db)
    _send(node_db, _queue(node_db, job1), "sent")
    result2 = _queue(node_db, job2)
    _send(node_db, result2, "refused")
    withdrawal = _withdraw_first(node_db, job1)
    _send(node_db, withdrawal, "failed")
    with node_db.factory() as s:
        assert deliveries_db.resend_deliveries(s, actor="admin", failed_to=RIS) == [result2]
        entries = list(s.scalars(select(AuditLog).where(AuditLog.action == "delivery.resend")))
    assert [(e.target, e.detail) for e in entries] == [
        (f"job:{job2}", {"deliveries": {str(result2): "failed"}})
    ]
    assert _state(node_db, withdrawal) == (DeliveryState.cancelled, _holding(job2))


def test_a_resent_withdrawal_is_held_back_by_a_later_result(node_db: NodeDB) -> None:
    """Job 2's result was refused, job 1's withdrawal went out, then job 2's result was sent
    again and reached the RIS. An admin re-sends job 1 (of a withdrawn job, its
    withdrawals): sent after job 2's result, OBX-11 ``W`` would mark it wrong, so it is
    held back and not in the answer."""
    job1, job2 = _drafted_twice(node_db)
    _send(node_db, _queue(node_db, job1), "sent")
    result2 = _queue(node_db, job2)
    withdrawal = _withdraw_first(node_db, job1)
    _send(node_db, result2, "refused")
    _send(node_db, withdrawal, "sent")
    with node_db.factory() as s:
        assert deliveries_db.resend_deliveries(s, actor="admin", ids=[result2]) == [result2]
    _send(node_db, result2, "sent")
    with node_db.factory() as s:
        assert deliveries_db.resend(s, job1, actor="admin") == []
    assert _state(node_db, withdrawal) == (DeliveryState.cancelled, _holding(job2))
    assert _claimed(node_db) == []


def test_a_resend_of_a_refused_result_does_not_deadlock_with_a_later_finish(
    node_db: NodeDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1 was withdrawn while job 2 was drafting: its withdrawal (a lower row id) was
    held back by job 2's result, then queued again when the RIS refused it. An admin
    re-sends job 2's result (which holds the withdrawal back again) while job 3, later
    still, queues its own result as it is done (which holds it back, and supersedes job
    2's). With the re-send locking job 2's row, then the withdrawal, and the finish the
    study, then the withdrawal and job 2's row, each waited for the other on PostgreSQL:
    the re-send takes the study's lock first now."""
    job1, job2 = _drafted_twice(node_db)
    job3 = _third(node_db, job1)
    _send(node_db, _queue(node_db, job1), "sent")
    withdrawal = _withdraw_first(node_db, job1)
    result2 = _queue(node_db, job2)
    assert withdrawal < result2
    _send(node_db, result2, "refused")
    assert node_db.delivery(withdrawal).state is DeliveryState.pending

    hold_orders, locked = delivery_resends._hold_orders, threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:  # job 2's row locked, the withdrawal not yet
        locked.set()
        time.sleep(1.0)
        return hold_orders(*args, **kwargs)

    monkeypatch.setattr(delivery_resends, "_hold_orders", held)
    errors: list[BaseException] = []

    def resending() -> None:
        try:
            with node_db.factory() as s:
                deliveries_db.resend_deliveries(s, actor="admin", ids=[result2])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=resending)
    thread.start()
    assert locked.wait(10)
    try:
        result3 = _queue(node_db, job3)
    except BaseException as exc:
        errors.append(exc)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []
    assert _state(node_db, withdrawal) == (DeliveryState.cancelled, _holding(job2))
    assert node_db.delivery(result2).state is DeliveryState.cancelled  # superseded by job 3
    assert _claimed(node_db) == [result3]
