"""Request and response bodies of the API (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AuditOut",
    "AuditPage",
    "CancelIn",
    "DeliveryOut",
    "DraftOut",
    "ErrorOut",
    "GenerateImageIn",
    "JobDetailOut",
    "JobOut",
    "JobPage",
    "PriorityIn",
    "ReportOut",
    "SessionIn",
    "SessionOut",
    "SrVersionOut",
    "TokenCreateIn",
    "TokenCreatedOut",
    "TokenOut",
    "VqaIn",
    "VqaOut",
    "WithdrawIn",
]

Role = Literal["viewer", "operator", "admin"]


class ErrorOut(BaseModel):
    """Every error answer."""

    detail: Any
    error: str | None = None
    status: int | None = None


class JobOut(BaseModel):
    """A job in a list."""

    id: int
    study_uid: str
    state: str
    priority: int
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    sr_uid: str | None
    lease_owner: str | None
    last_error: str | None
    withdrawn_at: datetime | None = None
    withdrawn_by: str | None = None
    withdrawn_reason: str | None = None


class JobPage(BaseModel):
    """A page of jobs, newest first, and the number of matches."""

    total: int
    limit: int
    offset: int
    items: list[JobOut]


class DraftOut(BaseModel):
    """A draft report (AI generated, unverified)."""

    id: int
    task: str
    text: str
    findings: str | None
    impression: str | None
    model_name: str
    model_version: str
    demo: bool
    timings: dict[str, Any] | None
    generation_settings: dict[str, Any] | None
    created_at: datetime


class DeliveryOut(BaseModel):
    """Delivery of one object (``sr``, ``basic-sr``, ``pdf``, ``report``, ``withdrawal``) to
    one destination of kind ``dimse``, ``stow``, ``hl7`` or ``fhir``."""

    id: int
    destination: str
    kind: str
    object: str = "sr"
    object_uid: str | None = None
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    sent_at: datetime | None
    last_error: str | None
    created_at: datetime


class AuditOut(BaseModel):
    """An audit-log row: who, what, when, on which target."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    detail: dict[str, Any] | None


class AuditPage(BaseModel):
    """A page of audit rows, newest first."""

    total: int
    limit: int
    offset: int
    items: list[AuditOut]


class StageOut(BaseModel):
    """One stage of a job with its start and duration."""

    name: str
    at: datetime | None
    seconds: float | None


class SrVersionOut(BaseModel):
    """One draft SR of the job's study; a later one supersedes the earlier ones."""

    job_id: int
    sr_uid: str
    finished_at: datetime | None
    withdrawn_at: datetime | None
    superseded: bool


class JobDetailOut(BaseModel):
    """One job: state, stages and timings, draft text, SR UID and the study's chain of draft
    SRs, delivery attempts, audit."""

    job: JobOut
    selected_sop_instance_uid: str | None
    lease_expires_at: datetime | None
    stages: list[StageOut]
    timings: dict[str, Any] | None
    draft: DraftOut | None
    drafts: list[DraftOut]
    deliveries: list[DeliveryOut]
    audit: list[AuditOut]
    sr_chain: list[SrVersionOut] = []


class CancelIn(BaseModel):
    """Why a job is cancelled (optional; no patient data)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


class WithdrawIn(BaseModel):
    """Why a sent draft is withdrawn (required; sent to the receivers: no patient data)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=256)


class PriorityIn(BaseModel):
    """The new priority; higher is claimed first."""

    model_config = ConfigDict(extra="forbid")

    priority: int = Field(ge=-1000, le=1000)


class TokenCreateIn(BaseModel):
    """A token to create."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9 ._@:-]+$")
    role: Role


class TokenOut(BaseModel):
    """A token (never its secret)."""

    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenCreatedOut(TokenOut):
    """A new token: ``token`` is shown this once and stored only hashed."""

    token: str


class SessionIn(BaseModel):
    """Log in to the web console with an API token."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=256)


class SessionOut(BaseModel):
    """The web session: send ``csrf_token`` as ``X-CSRF-Token`` on unsafe requests."""

    csrf_token: str | None
    token_id: int
    name: str
    role: str
    via: str
    expires_at: datetime | None


class VqaIn(BaseModel):
    """A question about a stored study's image."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=1000)
    sop_instance_uid: str | None = Field(
        default=None, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$"
    )


class ModelOut(BaseModel):
    """Provenance of a model output."""

    model_name: str
    model_version: str
    demo: bool
    timings: dict[str, float]


class VqaOut(ModelOut):
    """An answer (AI generated, unverified)."""

    study_uid: str
    sop_instance_uid: str
    image_choice: str
    question: str
    answer: str


class ReportOut(ModelOut):
    """A draft report for an uploaded image; nothing was stored or sent."""

    text: str
    findings: str | None
    impression: str
    sop_instance_uid: str | None
    sent: bool = False


class GenerateImageIn(BaseModel):
    """Report text to turn into a synthetic CXR."""

    model_config = ConfigDict(extra="forbid")

    report: str = Field(min_length=1, max_length=4000)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    greedy: bool | None = None
    study_uid: str | None = Field(default=None, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")
    send: bool = False
    destination: str | None = Field(default=None, max_length=512)
