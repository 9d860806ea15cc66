"""The console's Conversation page (``/chat``, #27): talk with the model about a stored
study's image or an uploaded one.

The page lists the recent studies (as the Try page does) and an upload form; ``static/
chat.js`` (no inline script: the CSP allows only the node's own scripts) starts the
conversation through ``POST /api/conversations``, posts each question to
``POST /api/conversations/{id}/turns`` and reads the Server-Sent Events of the answer with
``fetch`` and a ``ReadableStream`` reader, so the text appears as it is generated; Stop
posts ``/cancel``. "Summarize for the patient / clinician" streams a summary of the study's
draft (or pasted report text); a question starting "show me a CXR with ..." asks for a
synthetic image, shown inline and labelled SYNTHETIC. The user's recent conversations are
listed; ``/chat?conversation=ID`` reopens one (its transcript from
``GET /api/conversations/{id}``) to go on with it. Every answer is labelled AI-generated
(and DEMO for the demo model). Operators and admins may talk; the API enforces it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from node.db.conversations import ConversationSummary
from node.db.models import ID_MAX
from node.services import chat as chat_service
from node.services import jobs as job_service
from node.web import frame

__all__ = ["CONVERSATIONS_API", "router"]

router = APIRouter(include_in_schema=False)

CONVERSATIONS_API = "/api/conversations"
#: how many of the user's conversations the page lists
RECENT = 20


@router.get("/chat", name="web_chat", response_class=HTMLResponse)
def chat_page(
    request: Request,
    user: frame.PageUser,
    conversation: Annotated[int | None, Query(ge=1, le=ID_MAX)] = None,
) -> Response:
    """Pick a study or upload an image, then talk about it (answers streamed); or reopen
    one of the user's recent conversations (``?conversation=ID``)."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    recent: list[ConversationSummary] = []
    if user.has("operator"):
        recent, _total = chat_service.recent(ctx, actor=user.actor, limit=RECENT)
    return frame.render(
        request,
        "chat.html",
        page="chat",
        title="Talk about an image",
        user=user,
        studies=job_service.recent_studies(ctx),
        can_operate=user.has("operator"),
        api=CONVERSATIONS_API,
        max_upload_mb=ctx.settings.api_max_upload_mb,
        recent=recent,
        reopen=conversation,
    )
