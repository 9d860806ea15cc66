"""Deliveries: one outbound object to one destination, with its attempts."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import (
    Boolean,
    ColumnElement,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    false,
    or_,
)
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import Mapped, mapped_column, relationship

from node.db.models.base import UID_LEN, Base, enum_column
from node.db.models.states import DeliveryKind, DeliveryObject, DeliveryState

if TYPE_CHECKING:
    from node.db.models.jobs import Job

__all__ = ["Delivery"]


class Delivery(Base):
    """Delivery of one object of a job (SR, PDF, HL7/FHIR report, withdrawal) to one
    destination, with retries; ``job_id`` is NULL only for a synthetic Secondary Capture."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    destination: Mapped[str] = mapped_column(String(512))
    kind: Mapped[DeliveryKind] = mapped_column(enum_column(DeliveryKind, "delivery_kind"))
    object: Mapped[DeliveryObject] = mapped_column(
        enum_column(DeliveryObject, "delivery_object"),
        default=DeliveryObject.sr,
        server_default=DeliveryObject.sr.value,
    )
    # the object's own identifier: SOP Instance UID (DICOM), MSH-10 (HL7), report
    # identifier (FHIR); shown by the console and logs, never patient data
    object_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    state: Mapped[DeliveryState] = mapped_column(
        enum_column(DeliveryState, "delivery_state"), default=DeliveryState.pending
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    # when the latest attempt started (its claim); kept through retries and re-sends
    last_attempt_at: Mapped[datetime | None]
    # start of the current round of attempts (enqueue, re-send, re-queue after an outage):
    # transient failures are retried until delivery_retry_hours after it; NULL: created_at
    queued_at: Mapped[datetime | None]
    # a failed delivery that retrying cannot fix (0xA9xx/0xCxxx, HTTP 4xx, SR file missing);
    # only the others are re-queued when the destination answers again
    permanent_failure: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    # the file sent (any object, not only an SR): relative to the spool, or absolute
    sr_path: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime]

    job: Mapped[Job | None] = relationship(back_populates="deliveries")

    @hybrid_property
    def may_have_reached(self) -> bool:
        """Whether the receiver may hold the object: it was sent, or an attempt started
        (a failed send may still have arrived). ``last_attempt_at`` outlives a re-send or
        re-queue, so a row queued again still counts (a withdrawal must reach it)."""
        return (
            self.state is DeliveryState.sent
            or self.attempts > 0
            or self.last_attempt_at is not None
        )

    @may_have_reached.inplace.expression
    @classmethod
    def _may_have_reached_expression(cls) -> ColumnElement[bool]:
        return or_(
            cls.state == DeliveryState.sent, cls.attempts > 0, cls.last_attempt_at.is_not(None)
        )

    @hybrid_property
    def unsent(self) -> bool:
        """Whether the row is still to be sent: ``pending`` (queued, waiting for a retry, or
        being sent) or ``failed`` (a re-check or a re-send queues it again)."""
        return self.state in (DeliveryState.pending, DeliveryState.failed)

    @unsent.inplace.expression
    @classmethod
    def _unsent_expression(cls) -> ColumnElement[bool]:
        return cls.state.in_([DeliveryState.pending, DeliveryState.failed])

    @hybrid_property
    def order_withdrawal(self) -> bool:
        """Whether the row is an HL7 withdrawal: its ORU^R01 (OBR-25 ``C``, OBX-11 ``W``)
        marks the result of the order, which a later draft's ORU^R01 replaces there."""
        return self.object is DeliveryObject.withdrawal and self.kind is DeliveryKind.hl7

    @order_withdrawal.inplace.expression
    @classmethod
    def _order_withdrawal_expression(cls) -> ColumnElement[bool]:
        return and_(cls.object == DeliveryObject.withdrawal, cls.kind == DeliveryKind.hl7)

    def requeue(self, now: datetime) -> None:
        """Back to ``pending``, due ``now``: fresh attempts and retry horizon
        (``queued_at``), no error, no permanent failure, not sent (``last_attempt_at``
        stays: the object may be at the receiver, :attr:`may_have_reached`).

        A cancelled row that keeps the end of a claim later than ``now`` (:meth:`cancel`: a
        send of it may be under way, or it waited for a retry) resumes that round instead:
        due at that end, its attempts and horizon kept, so that the object does not go
        twice at once, nothing queued after it overtakes the send under way, and that
        send, still fenced by that time, records its outcome as the round's."""
        kept = self.next_attempt_at if self.state is DeliveryState.cancelled else None
        self.state = DeliveryState.pending
        self.last_error = None
        if kept is not None and kept > now:
            self.next_attempt_at = kept
            return
        self.attempts = 0
        self.next_attempt_at = now
        self.queued_at = now
        self.permanent_failure = False
        self.sent_at = None

    def may_be_claimed(self, now: datetime) -> bool:
        """Whether a sender may hold a claim on this ``pending`` row at ``now``: ever
        attempted, and not due before a later time (a claim's end, or a retry's time, which
        the row cannot tell apart)."""
        return (
            self.state is DeliveryState.pending
            and self.last_attempt_at is not None
            and self.next_attempt_at is not None
            and self.next_attempt_at > now
        )

    def cancel(self, why: str) -> None:
        """Cancel this unsent row (``pending`` or ``failed``), with ``why`` as its error: no
        retry, re-queue or re-send sends it; a send in flight loses its claim (its lease
        no longer matches), so its result is not recorded.

        A ``pending`` row ever attempted keeps ``next_attempt_at``: the end of the claim of a
        send that may still be under way, and reach the receiver until then (the row
        cannot tell a claim from a wait for a retry, which keeps it as long). No other row
        of the study is claimed for that destination until then, or until that send reports
        (:func:`node.db.delivery_claims.claim_due_deliveries`), so nothing queued after the
        cancel (a withdrawal, a newer draft) arrives before it. Other rows keep none."""
        if not (self.state is DeliveryState.pending and self.last_attempt_at is not None):
            self.next_attempt_at = None
        self.state = DeliveryState.cancelled
        self.last_error = why

    __table_args__ = (
        Index(None, "state", "next_attempt_at"),
        # one delivery per (job, destination, object): enqueueing is idempotent
        UniqueConstraint("job_id", "destination", "object"),
    )
