"""SQLAlchemy 2.0 typed models of the node's database.

The tables hold no patient names, IDs or birth dates: the spooled DICOM files carry those.
What is kept is what the node needs to route, assemble and audit: DICOM UIDs, modality, body
part, descriptions (for the chest rule), file locations and checksums, job and delivery state.
Every change here needs an Alembic revision in ``node/db/migrations/versions``; a test checks
that the migrations produce exactly this metadata.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ApiRole",
    "ApiSession",
    "ApiToken",
    "Association",
    "AuditLog",
    "Base",
    "Conversation",
    "ConversationTurn",
    "Delivery",
    "DeliveryKind",
    "DeliveryObject",
    "DeliveryState",
    "Draft",
    "Instance",
    "Job",
    "JobEvent",
    "JobState",
    "RefusedInstance",
    "Series",
    "Study",
    "StudyState",
    "UTCDateTime",
    "utcnow",
]

UID_LEN = 64  # PS3.5 §9.1: a UID is at most 64 characters
AE_LEN = 16  # PS3.5 §6.2 VR AE


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of time stored)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware.

    SQLite has no time zone type: values are stored as naive UTC there, so that string
    comparison in SQL orders them correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StudyState(enum.StrEnum):
    """Where a study stands in assembly."""

    receiving = "receiving"
    complete = "complete"
    skipped = "skipped"


class JobState(enum.StrEnum):
    """Job life cycle: received -> queued -> running -> done | failed | cancelled."""

    received = "received"
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class DeliveryKind(enum.StrEnum):
    """How an object is delivered: the destination's protocol.

    ``dimse`` C-STORE (PS3.4 Annex B), ``stow`` STOW-RS (PS3.18 §10.5), ``hl7`` an HL7 v2.5.1
    ORU^R01 over MLLP, ``fhir`` a FHIR R4 transaction Bundle.
    """

    dimse = "dimse"
    stow = "stow"
    hl7 = "hl7"
    fhir = "fhir"


class DeliveryObject(enum.StrEnum):
    """What a delivery carries (:attr:`Delivery.object`).

    ``sr`` the Comprehensive SR (TID 2000), ``basic-sr`` a Basic Text SR, ``pdf`` the AI
    DRAFT Encapsulated PDF, ``report`` the draft as an HL7 ORU or FHIR Bundle,
    ``withdrawal`` the withdrawal of a sent draft (an IOCM Key Object Selection rejection
    note, an HL7 ORU with OBR-25 ``C``/OBX-11 ``W``, a FHIR ``entered-in-error`` update),
    ``sc`` a synthetic Secondary Capture sent on request (no job), ``coded-sr`` the draft's
    CheXpert observations coded (TID 1500, :mod:`integration.coded_findings`).
    """

    sr = "sr"
    basic_sr = "basic-sr"
    pdf = "pdf"
    coded_sr = "coded-sr"
    report = "report"
    withdrawal = "withdrawal"
    sc = "sc"


class DeliveryState(enum.StrEnum):
    """Delivery of one object to one destination.

    ``cancelled``: not sent because the draft was withdrawn first.
    """

    pending = "pending"
    sent = "sent"
    failed = "failed"
    cancelled = "cancelled"


class FinalSource(enum.StrEnum):
    """How a final report reached the node."""

    dicom_sr = "dicom-sr"
    """A Structured Report over DICOM (Verification Flag VERIFIED, or from a report source)."""
    dicom_pdf = "dicom-pdf"
    """An Encapsulated PDF over DICOM from a configured report source."""
    hl7 = "hl7"
    """An HL7 v2 ORU^R01 with result status F (or C) over the MLLP listener."""
    review = "review"
    """A reviewer's decision at the node: the draft accepted or edited (the final text), or
    rejected (no text; not scored)."""


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention (stable constraint names for Alembic)."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Study(Base):
    """A study (Study Instance UID 0020,000D) as assembled from received instances."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    state: Mapped[StudyState] = mapped_column(
        _enum(StudyState, "study_state"), default=StudyState.receiving
    )
    skip_reason: Mapped[str | None] = mapped_column(Text)
    study_description: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(AE_LEN))
    # Accession Number (0008,0050, SH): matches a final report without a Study Instance UID
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    # identity shown to admins in the console (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study);
    # patient data: searchable here, never logged. Patient's Name (0010,0010) as sent
    # (component groups joined by "="), Patient ID (0010,0020), Study Date (0008,0020) as
    # YYYYMMDD, and the modalities of the study's series joined by "\" (as (0008,0061)).
    patient_name: Mapped[str | None] = mapped_column(String(200), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    modalities: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    series_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    # start of the current receiving period (reset when a late instance reopens the study);
    # forced completion counts from here
    receiving_since: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    forced_completion: Mapped[bool] = mapped_column(Boolean, default=False)

    series: Mapped[list[Series]] = relationship(back_populates="study", passive_deletes=True)
    jobs: Mapped[list[Job]] = relationship(back_populates="study", passive_deletes=True)

    __table_args__ = (Index(None, "state", "last_received_at"),)


class Series(Base):
    """A series (Series Instance UID 0020,000E) of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    """A received SOP instance and where its file lies in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LEN))
    spool_path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime]
    calling_ae: Mapped[str | None] = mapped_column(String(AE_LEN))
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    replaced_count: Mapped[int] = mapped_column(Integer, default=0)
    # the association that delivered it (receive log); kept when the log row is purged
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), index=True
    )


class Job(Base):
    """One inference run for a study; rows are the queue (see ``node.db.jobs``)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.received)
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


class Delivery(Base):
    """Delivery of one object of a job (SR, PDF, HL7/FHIR report, withdrawal) to one
    destination, with retries; ``job_id`` is NULL only for a synthetic Secondary Capture."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    destination: Mapped[str] = mapped_column(String(512))
    kind: Mapped[DeliveryKind] = mapped_column(_enum(DeliveryKind, "delivery_kind"))
    object: Mapped[DeliveryObject] = mapped_column(
        _enum(DeliveryObject, "delivery_object"),
        default=DeliveryObject.sr,
        server_default=DeliveryObject.sr.value,
    )
    # the object's own identifier: SOP Instance UID (DICOM), MSH-10 (HL7), report
    # identifier (FHIR); shown by the console and logs, never patient data
    object_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), default=DeliveryState.pending
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

    __table_args__ = (
        Index(None, "state", "next_attempt_at"),
        # one delivery per (job, destination, object): enqueueing is idempotent
        UniqueConstraint("job_id", "destination", "object"),
    )


class AuditLog(Base):
    """An admin or system action worth keeping (who, what, on which target)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(256))
    detail: Mapped[dict[str, Any] | None]


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


class Association(Base):
    """One DICOM association offered to the storage SCP (the receive log, PS3.8 7.1).

    ``outcome``: ``open`` while it lasts, then ``released``, ``aborted`` or ``rejected``
    (A-ASSOCIATE-RJ, ``reason`` says why). ``accepted``/``refused`` count C-STORE requests
    answered with success (or warning) and with a failure status; ``statuses`` counts them
    by status (``{"0xA900": 2}``).
    """

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(index=True)
    ended_at: Mapped[datetime | None]
    calling_ae: Mapped[str | None] = mapped_column(String(AE_LEN), index=True)
    called_ae: Mapped[str | None] = mapped_column(String(AE_LEN))
    address: Mapped[str | None] = mapped_column(String(64))
    port: Mapped[int | None] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    outcome: Mapped[str] = mapped_column(String(16), default="open")
    reason: Mapped[str | None] = mapped_column(String(256))
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    statuses: Mapped[dict[str, Any] | None]


class RefusedInstance(Base):
    """A C-STORE request the node refused: its status and reason, for the receive log."""

    __tablename__ = "refused_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime]
    study_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    sop_class_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(256))


class FinalReport(Base):
    """A radiologist's final report of a study, and how the node's draft compares with it.

    Matched to the study's latest report draft by Study Instance UID or accession number
    (``job_id``, ``draft_id``); unmatched until a draft exists. The concordance columns are
    filled when matched (``models.concordance``; labels as ``{observation: label}``).
    Report text: never logged.
    """

    __tablename__ = "final_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[FinalSource] = mapped_column(_enum(FinalSource, "final_source"))
    # SOP Instance UID, or the HL7 message control ID (MSH-10, ST up to 199 characters)
    object_uid: Mapped[str] = mapped_column(String(200))
    sender: Mapped[str | None] = mapped_column(String(128))
    study_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    verified: Mapped[bool] = mapped_column(Boolean, default=True)
    findings: Mapped[str | None] = mapped_column(Text)
    impression: Mapped[str | None] = mapped_column(Text)
    full_text: Mapped[str] = mapped_column(Text)
    signed_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(index=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    draft_id: Mapped[int | None] = mapped_column(ForeignKey("drafts.id", ondelete="SET NULL"))
    matched_at: Mapped[datetime | None]
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    draft_labels: Mapped[dict[str, Any] | None]
    final_labels: Mapped[dict[str, Any] | None]
    agreement: Mapped[float | None] = mapped_column(Float)
    discrepancies: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    significant: Mapped[bool] = mapped_column(Boolean, default=False)
    bleu4: Mapped[float | None] = mapped_column(Float)
    rouge_l: Mapped[float | None] = mapped_column(Float)
    turnaround_s: Mapped[float | None] = mapped_column(Float)
    # a review at the node: accept, edit or reject, and the reason of a rejection
    review_decision: Mapped[str | None] = mapped_column(String(16))
    review_reason: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (UniqueConstraint("source", "object_uid"),)


class ApiRole(enum.StrEnum):
    """Roles of API tokens: viewer < operator < admin, and reviewer beside them.

    ``reviewer`` is a radiologist: sees what a viewer sees and reviews drafts (accept, edit,
    reject); no other role may review, and a reviewer cannot operate the queue.
    """

    viewer = "viewer"
    operator = "operator"
    admin = "admin"
    reviewer = "reviewer"

    @property
    def rank(self) -> int:
        """0 for viewer and reviewer, 1 for operator, 2 for admin."""
        return {"viewer": 0, "reviewer": 0, "operator": 1, "admin": 2}[self.value]


class ApiToken(Base):
    """A bearer token of the admin API; only the SHA-256 of the token is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[ApiRole] = mapped_column(_enum(ApiRole, "api_role"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class ApiSession(Base):
    """A web-console session opened with a token (cookie auth); ids stored hashed."""

    __tablename__ = "api_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True
    )
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class Conversation(Base):
    """A conversation about one chest X-ray (``node.services.chat``): a stored study's image
    or an upload. Only the image's 256 VQ-GAN codes are kept (an upload is stored nowhere
    else); its turns are questions and answers (text: never logged). Purged by retention.
    """

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(index=True)
    # the token's audit actor (``token:<id>:<name>``, ``cli``)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    source: Mapped[str] = mapped_column(String(16))  # "study" or "upload"
    image_codes: Mapped[list[int]] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    demo: Mapped[bool] = mapped_column(Boolean, default=False)

    turns: Mapped[list[ConversationTurn]] = relationship(
        back_populates="conversation", passive_deletes=True, order_by="ConversationTurn.id"
    )


class ConversationTurn(Base):
    """One turn of a conversation: a question and its answer, a plain-language summary
    (``audience``) of a report, or a synthetic image made from a report (``image_png``).
    Question and answer text: never logged."""

    __tablename__ = "conversation_turns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))  # "question", "summary", "image"
    # the question, the report summarized, or the report the image was made from
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text, default="")
    audience: Mapped[str | None] = mapped_column(String(16))
    stop_reason: Mapped[str] = mapped_column(String(16))
    dropped_turns: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    new_tokens: Mapped[int] = mapped_column(Integer, default=0)
    timings: Mapped[dict[str, Any] | None]
    # the synthetic image of an "image" turn (256x256 grey PNG)
    image_png: Mapped[bytes | None] = mapped_column(LargeBinary)

    conversation: Mapped[Conversation] = relationship(back_populates="turns")
