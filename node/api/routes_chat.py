"""Conversations about a chest X-ray (#27): start one on a stored study or an upload, ask
questions with streamed answers, plain-language summaries, synthetic images, cancel.

Operator role and above (viewers and reviewers get 403); a conversation is seen by the
person who started it (and admins). Streamed routes answer ``text/event-stream`` (Server-Sent
Events, one ``event:`` and one JSON ``data:`` line each): ``delta`` ``{"text"}`` as the
answer is generated, ``notice`` ``{"dropped_turns", "message"}`` before the answer when the
oldest turns were left out of the model's window, then ``done`` ``{"stop_reason",
"turn_id", "ai_generated", "demo", ...}`` or ``error`` ``{"status", "detail"}``. Errors found
before the answer starts (unknown conversation, a turn already running, the model not
ready, no report to summarize) are ordinary JSON error answers. A client that goes away
stops its answer (stored as ``cancelled``). Every answer is AI generated and unverified.

``router`` holds the JSON routes; ``upload_router`` the start (``POST /api/conversations``,
JSON or multipart), which :func:`node.api.app.create_app` includes with the
``api_max_upload_mb`` body limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from node.api.deps import AUTH_ERRORS, MODEL_ERRORS, Ctx, Limit, Offset, Operator
from node.api.errors import ApiError
from node.api.schemas import UID_PATTERN, ErrorOut, json_or_multipart_body
from node.api.sse import stream_turn
from node.db.conversations import ConversationRecord, ConversationSummary, TurnRecord
from node.db.models import ID_MAX
from node.services import chat
from node.services.images import MIB

__all__ = ["ConversationList", "ConversationOut", "TurnOut", "router", "upload_router"]

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    404: {"model": ErrorOut, "description": "no such conversation (or not yours)"},
    409: {"model": ErrorOut, "description": "a turn of this conversation is running"},
    **MODEL_ERRORS,
}
router = APIRouter(prefix="/api/conversations", tags=["conversations"], responses=_ERRORS)
upload_router = APIRouter(prefix="/api/conversations", tags=["conversations"], responses=_ERRORS)
ConvId = Annotated[int, Path(ge=1, le=ID_MAX)]
TurnId = Annotated[int, Path(ge=1, le=ID_MAX)]
_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "Server-Sent Events: delta, notice, done or error",
    }
}


# --- bodies and answers -----------------------------------------------------------------------


class ConversationStudyIn(BaseModel):
    """Start a conversation about a stored study's image."""

    model_config = ConfigDict(extra="forbid")

    study_uid: str = Field(min_length=1, max_length=64, pattern=UID_PATTERN)
    sop_instance_uid: str | None = Field(default=None, max_length=64, pattern=UID_PATTERN)


class QuestionIn(BaseModel):
    """A question about the conversation's image."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=8000)
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024)


class SummaryIn(BaseModel):
    """A plain-language summary of a report: pasted text, a job's draft, or (neither) the
    draft of the conversation's study."""

    model_config = ConfigDict(extra="forbid")

    audience: Literal["clinician", "patient"]
    report: str | None = Field(default=None, max_length=20000)
    job_id: int | None = Field(default=None, ge=1, le=ID_MAX)
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024)


class ImageIn(BaseModel):
    """ "Show me a CXR with ...": the report text the synthetic image is made from."""

    model_config = ConfigDict(extra="forbid")

    report: str = Field(min_length=1, max_length=2000)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


class TurnOut(BaseModel):
    """A turn: question and answer (AI generated, unverified), summary, or synthetic image."""

    id: int
    at: datetime
    kind: Literal["question", "summary", "image"]
    question: str
    answer: str
    audience: str | None
    stop_reason: str
    dropped_turns: int
    prompt_tokens: int
    new_tokens: int
    timings: dict[str, Any] | None
    image_url: str | None = Field(description="the synthetic PNG of an image turn")
    synthetic: bool = Field(description="an image made by the model, not a patient image")
    ai_generated: bool = True
    demo: bool


class ConversationOut(BaseModel):
    """A conversation and its turns, oldest first."""

    id: int
    created_at: datetime
    updated_at: datetime
    source: Literal["study", "upload"]
    study_uid: str | None
    sop_instance_uid: str | None
    model_name: str
    model_version: str
    demo: bool
    ai_generated: bool = True
    turns: list[TurnOut]


class ConversationItem(BaseModel):
    """A conversation in a list (no turn text)."""

    id: int
    created_at: datetime
    updated_at: datetime
    actor: str
    source: Literal["study", "upload"]
    study_uid: str | None
    model_name: str
    model_version: str
    demo: bool
    turn_count: int
    url: str = Field(description="the console page that reopens it")


class ConversationList(BaseModel):
    """One page of conversations, the most recently updated first."""

    total: int
    items: list[ConversationItem]


class CancelOut(BaseModel):
    """Whether a running turn was told to stop."""

    cancelled: bool


def _turn_out(conv_id: int, t: TurnRecord, demo: bool) -> TurnOut:
    url = f"/api/conversations/{conv_id}/turns/{t.id}/image.png" if t.has_image else None
    return TurnOut.model_validate(
        {**asdict(t), "image_url": url, "synthetic": t.kind == "image", "demo": demo}
    )


def _conversation_out(c: ConversationRecord) -> ConversationOut:
    turns = [_turn_out(c.id, t, c.demo) for t in c.turns]
    return ConversationOut.model_validate({**asdict(c), "turns": turns})


def _item(c: ConversationSummary) -> ConversationItem:
    return ConversationItem.model_validate({**asdict(c), "url": f"/chat?conversation={c.id}"})


async def _prepare(ctx: Any, conv_id: int, actor: str, admin: bool) -> ConversationRecord:
    conv = await run_in_threadpool(chat.conversation, ctx, conv_id, actor=actor, admin=admin)
    chat.require_model(ctx)
    return conv


# --- routes -----------------------------------------------------------------------------------


@upload_router.post(
    "",
    response_model=ConversationOut,
    status_code=201,
    responses={413: {"model": ErrorOut, "description": "upload over api_max_upload_mb"}},
    openapi_extra=json_or_multipart_body(
        {
            "type": "object",
            "properties": {
                "study_uid": {"type": "string", "maxLength": 64, "pattern": UID_PATTERN},
                "sop_instance_uid": {"type": "string", "maxLength": 64, "pattern": UID_PATTERN},
            },
            "required": ["study_uid"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"file": {"type": "string", "format": "binary"}},
            "required": ["file"],
        },
    ),
    summary="Start a conversation about a stored study or an uploaded image (operator)",
)
async def start(request: Request, ctx: Ctx, p: Operator) -> ConversationOut:
    """JSON ``{"study_uid"}`` (the study's frontal image, or ``sop_instance_uid``) or a
    multipart ``file`` (DICOM Part 10 or PNG, at most ``api_max_upload_mb`` MiB; only its
    256 image codes are kept). The image is encoded by the model once. Audited."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        limit = ctx.settings.api_max_upload_mb * MIB
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "multipart field 'file' (a DICOM image or PNG) is required")
        data = await upload.read(limit + 1)
        conv = await run_in_threadpool(
            chat.start_for_upload, ctx, data, actor=p.actor, max_bytes=limit
        )
    elif kind == "application/json":
        try:
            body = ConversationStudyIn.model_validate_json(await request.body())
        except ValidationError as exc:
            raise ApiError(422, f"invalid body: {exc.errors(include_url=False)}") from None
        conv = await run_in_threadpool(
            chat.start_for_study,
            ctx,
            body.study_uid,
            actor=p.actor,
            sop_instance_uid=body.sop_instance_uid,
        )
    else:
        raise ApiError(415, "send application/json {study_uid} or multipart/form-data file")
    return _conversation_out(conv)


@router.get(
    "",
    response_model=ConversationList,
    summary="Your conversations, most recent first (operator; everyone's for an admin)",
)
def list_conversations(
    ctx: Ctx,
    p: Operator,
    everyone: Annotated[bool, Query(alias="all", description="everyone's (admin)")] = False,
    limit: Limit = 50,
    offset: Offset = 0,
) -> ConversationList:
    """Ids, times, study, model and turn count; the turns' text only by
    ``GET /api/conversations/{id}``."""
    items, total = chat.recent(
        ctx, actor=p.actor, everyone=everyone, admin=p.has("admin"), limit=limit, offset=offset
    )
    return ConversationList(total=total, items=[_item(c) for c in items])


@router.get(
    "/{conversation_id}",
    response_model=ConversationOut,
    summary="A conversation and its turns (operator; the owner's or an admin)",
)
def get_conversation(conversation_id: ConvId, ctx: Ctx, p: Operator) -> ConversationOut:
    """The transcript: questions, answers (AI generated, unverified), summaries, images."""
    return _conversation_out(
        chat.conversation(ctx, conversation_id, actor=p.actor, admin=p.has("admin"))
    )


@router.post(
    "/{conversation_id}/turns",
    response_class=StreamingResponse,
    responses=_SSE_DOC,
    summary="Ask a question; the answer streams as Server-Sent Events (operator)",
)
async def ask(conversation_id: ConvId, body: QuestionIn, ctx: Ctx, p: Operator) -> Response:
    """The earlier answered questions are the context; the oldest are left out (``notice``)
    when the model's 2,048-token window would overflow. Audited ``conversation.turn``."""
    admin = p.has("admin")
    await _prepare(ctx, conversation_id, p.actor, admin)
    handle = chat.reserve(conversation_id)

    def run(on_text: Callable[[str], object], on_notice: Callable[[int], object]) -> Any:
        return chat.ask(
            ctx,
            conversation_id,
            body.question,
            actor=p.actor,
            admin=admin,
            on_text=on_text,
            on_notice=on_notice,
            handle=handle,
            max_new_tokens=body.max_new_tokens,
        )

    return stream_turn(run, handle)


@router.post(
    "/{conversation_id}/summary",
    response_class=StreamingResponse,
    responses=_SSE_DOC,
    summary="Summarize a report for the patient or the clinician, streamed (operator)",
)
async def summary(conversation_id: ConvId, body: SummaryIn, ctx: Ctx, p: Operator) -> Response:
    """The report is ``report``, job ``job_id``'s draft, or the draft of the conversation's
    study. Audited ``conversation.summary``."""
    admin = p.has("admin")
    conv = await _prepare(ctx, conversation_id, p.actor, admin)
    text = await run_in_threadpool(
        chat.resolve_report, ctx, conv, job_id=body.job_id, report=body.report
    )
    handle = chat.reserve(conversation_id)

    def run(on_text: Callable[[str], object], _on_notice: Callable[[int], object]) -> Any:
        return chat.summarize(
            ctx,
            conversation_id,
            actor=p.actor,
            admin=admin,
            audience=body.audience,
            report=text,
            on_text=on_text,
            handle=handle,
            max_new_tokens=body.max_new_tokens,
        )

    return stream_turn(run, handle)


@router.post(
    "/{conversation_id}/image",
    response_model=TurnOut,
    status_code=201,
    summary='"Show me a CXR with ...": a synthetic image from report text (operator)',
)
def image(conversation_id: ConvId, body: ImageIn, ctx: Ctx, p: Operator) -> TurnOut:
    """Report -> CXR (exactly 256 VQ-GAN codes decoded); the turn with the PNG's URL. The
    image is SYNTHETIC, never a patient's. Audited ``conversation.image``."""
    admin = p.has("admin")
    chat.conversation(ctx, conversation_id, actor=p.actor, admin=admin)
    chat.require_model(ctx)
    out = chat.show_image(
        ctx, conversation_id, body.report, actor=p.actor, admin=admin, seed=body.seed
    )
    return _turn_out(conversation_id, out.turn, out.demo)


@router.get(
    "/{conversation_id}/turns/{turn_id}/image.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the SYNTHETIC image"}},
    summary="The synthetic PNG of an image turn (operator)",
)
def turn_image(conversation_id: ConvId, turn_id: TurnId, ctx: Ctx, p: Operator) -> Response:
    """256x256 grey PNG made by the model (``X-Synthetic: true``)."""
    png = chat.turn_png(ctx, conversation_id, turn_id, actor=p.actor, admin=p.has("admin"))
    return Response(
        png,
        media_type="image/png",
        headers={"Cache-Control": "no-store", "X-Synthetic": "true", "X-AI-Generated": "true"},
    )


@router.post(
    "/{conversation_id}/cancel",
    response_model=CancelOut,
    summary="Stop the conversation's running answer (operator)",
)
def cancel(conversation_id: ConvId, ctx: Ctx, p: Operator) -> CancelOut:
    """The answer stops at its next token and is stored as ``cancelled`` with its text so
    far; ``cancelled: false`` when nothing was running."""
    return CancelOut(
        cancelled=chat.cancel(ctx, conversation_id, actor=p.actor, admin=p.has("admin"))
    )
