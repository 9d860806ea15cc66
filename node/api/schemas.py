"""Request and response bodies of the API (pydantic; they make the OpenAPI schema).

A job, draft, delivery, audit row, SR version and token have one shape each, the read
models of :mod:`node.db` (``JobRow``, ``DraftRow``, ``DeliveryRow``, ``AuditEntry``,
``SrVersion``, ``TokenRow``), used as they are by the API, the console and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from integration.priority import MAX_PRIORITY, MIN_PRIORITY
from node.db.audit import AuditEntry
from node.db.finals import FinalRow
from node.db.job_admin import CANCEL_REASON_MAX_LENGTH
from node.db.job_events import JobEventRow
from node.db.models import ID_MAX
from node.db.tokens import NAME_MAX_LENGTH, NAME_PATTERN, TokenRow
from node.db.views import DeliveryRow, DraftRow, JobRow, SrVersion
from node.db.withdrawals import REASON_MAX_LENGTH as WITHDRAW_REASON_MAX_LENGTH

__all__ = [
    "UID_PATTERN",
    "AuditPage",
    "CancelIn",
    "ErrorOut",
    "GenerateImageIn",
    "JobDetailOut",
    "JobPage",
    "PriorityIn",
    "ReportOut",
    "ReviewIn",
    "SessionIn",
    "SessionOut",
    "TokenCreateIn",
    "TokenCreatedOut",
    "VqaIn",
    "VqaOut",
    "WithdrawIn",
    "json_or_multipart_body",
]

Role = Literal["viewer", "operator", "admin", "reviewer"]
#: a DICOM UID (PS3.5 9.1): digits in components separated by dots (the 64-character bound
#: is each field's own ``max_length``)
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


def json_or_multipart_body(
    json_schema: dict[str, Any], form_schema: dict[str, Any]
) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that reads its body itself, which is either JSON or
    ``multipart/form-data`` (an upload).

    Parameters
    ----------
    json_schema
        The JSON Schema of the ``application/json`` body.
    form_schema
        The JSON Schema of the ``multipart/form-data`` fields.

    Returns
    -------
    dict
        ``{"requestBody": ...}``: a required body of either content type.
    """
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": json_schema},
                "multipart/form-data": {"schema": form_schema},
            },
        }
    }


class ErrorOut(BaseModel):
    """Every error answer."""

    detail: Any
    error: str | None = None
    status: int | None = None


class JobPage(BaseModel):
    """A page of jobs, newest first, and the number of matches."""

    total: int
    limit: int
    offset: int
    items: list[JobRow]


class AuditPage(BaseModel):
    """A page of audit rows, newest first."""

    total: int
    limit: int
    offset: int
    items: list[AuditEntry]


class StageOut(BaseModel):
    """One stage of a job with its start and duration."""

    name: str
    at: datetime | None
    seconds: float | None


class ObjectOut(BaseModel):
    """One DICOM object a job made (``present``: still stored)."""

    key: str
    object: str
    uid: str | None
    present: bool
    size: int | None


class JobDetailOut(BaseModel):
    """One job: state, stages and timings, draft text, SR UID and the study's chain of draft
    SRs, delivery attempts, audit."""

    job: JobRow
    selected_sop_instance_uid: str | None
    lease_expires_at: datetime | None
    stages: list[StageOut]
    timings: dict[str, Any] | None
    draft: DraftRow | None
    drafts: list[DraftRow]
    deliveries: list[DeliveryRow]
    audit: list[AuditEntry]
    sr_chain: list[SrVersion] = []
    finals: list[FinalRow] = []
    """Final reports matched to the draft, with labels and concordance (text included)."""
    events: list[JobEventRow] = []
    """The job's history, oldest first: received, queued, claimed, stages, drafted,
    delivery attempts, done/failed/cancelled (operator actions are in ``audit``)."""
    objects: list[ObjectOut] = []
    """The DICOM objects the job made, to download from ``/api/jobs/{id}/objects/{key}``."""
    viewer_url: str | None = None
    """The study in the site's viewer (``viewer_url_template``), when configured."""


class CancelIn(BaseModel):
    """Why a job is cancelled (optional; no patient data)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=CANCEL_REASON_MAX_LENGTH)


class BulkIn(BaseModel):
    """A bulk action on jobs: ``retry``, ``cancel`` or ``resend`` each of ``ids``."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["retry", "cancel", "resend"]
    ids: list[Annotated[int, Field(ge=1, le=ID_MAX)]] = Field(min_length=1, max_length=500)


class BulkItemOut(BaseModel):
    """What one job of a bulk action came to."""

    job_id: int
    ok: bool
    error: str | None = None


class BulkOut(BaseModel):
    """Per job, in the order given."""

    results: list[BulkItemOut]


class WithdrawIn(BaseModel):
    """Why a sent draft is withdrawn (required; sent to the receivers: no patient data)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=WITHDRAW_REASON_MAX_LENGTH)


class ReviewIn(BaseModel):
    """A reviewer's decision on a draft: ``accept``, ``edit`` (with the edited ``text``) or
    ``reject`` (with a ``reason``; no patient data)."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["accept", "edit", "reject"]
    text: str | None = Field(default=None, max_length=20_000)
    reason: str | None = Field(default=None, max_length=256)


class PriorityIn(BaseModel):
    """The new priority; higher is claimed first."""

    model_config = ConfigDict(extra="forbid")

    priority: int = Field(ge=MIN_PRIORITY, le=MAX_PRIORITY)


class TokenCreateIn(BaseModel):
    """A token to create."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)
    role: Role


@dataclass(frozen=True)
class TokenCreatedOut(TokenRow):
    """A new token: ``token`` is shown this once and stored only hashed."""

    token: str = field(kw_only=True)


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
    sop_instance_uid: str | None = Field(default=None, max_length=64, pattern=UID_PATTERN)


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
    study_uid: str | None = Field(default=None, max_length=64, pattern=UID_PATTERN)
    send: bool = False
    destination: str | None = Field(default=None, max_length=512)
