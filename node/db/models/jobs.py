"""Jobs (a study's drafting), their drafts and their history."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from node.db.models.base import UID_LEN, Base, enum_column
from node.db.models.states import JobState

if TYPE_CHECKING:
    from node.db.models.deliveries import Delivery
    from node.db.models.studies import Study

__all__ = ["Draft", "Job", "JobEvent"]


class Job(Base):
    """One inference run for a study; rows are the queue (see ``node.db.jobs``)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(
        enum_column(JobState, "job_state"), default=JobState.received
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    # a queued job retried after a transient failure is not claimed before this (back-off)
    not_before: Mapped[datetime | None]
    created_at: Mapped[datetime]
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    last_error: Mapped[str | None] = mapped_column(Text)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    selected_sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    # a sent draft withdrawn by an operator (IHE IOCM rejection, HL7/FHIR withdrawal)
    withdrawn_at: Mapped[datetime | None]
    withdrawn_by: Mapped[str | None] = mapped_column(String(128))
    withdrawn_reason: Mapped[str | None] = mapped_column(String(256))
    # the routing rule that made this job, and what it chose (``None``: the node's defaults)
    rule: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(128))
    destinations: Mapped[list[str] | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="jobs")
    drafts: Mapped[list[Draft]] = relationship(back_populates="job", passive_deletes=True)
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", passive_deletes=True)

    __table_args__ = (Index(None, "state", "priority", "queued_at"),)


class Draft(Base):
    """A report drafted by the model for a job (report text: never logged)."""

    __tablename__ = "drafts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(32), default="report")
    findings: Mapped[str | None] = mapped_column(Text)
    impression: Mapped[str | None] = mapped_column(Text)
    full_text: Mapped[str] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    demo: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt: Mapped[str | None] = mapped_column(Text)
    generation_settings: Mapped[dict[str, Any] | None]
    timings: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]

    job: Mapped[Job] = relationship(back_populates="drafts")


class JobEvent(Base):
    """One step in a job's history: received, queued, claimed by a worker, a stage with its
    duration, drafted, each delivery attempt, an operator action (``kind``, ``detail``)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(index=True)
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict[str, Any] | None]
