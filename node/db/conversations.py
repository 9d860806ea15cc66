"""Conversations about a chest X-ray and their turns (:mod:`node.services.chat`).

Each change is one transaction with its audit row (``conversation.start``,
``conversation.turn``, ``conversation.summary``, ``conversation.image``): the audit detail
holds ids, counts and the stop reason, never the question, the answer or a report.
Retention deletes conversations with the studies (:func:`delete_conversations`, called by
:func:`node.db.retention.purge_expired_studies`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from node.db.audit import add_audit
from node.db.models import Conversation, ConversationTurn, Draft, Job, JobState, Study, utcnow
from node.db.queries import page
from node.db.read_models import read_model
from node.db.tx import in_transaction

__all__ = [
    "HISTORY_STOP_REASONS",
    "ConversationNotFound",
    "ConversationRecord",
    "ConversationSummary",
    "TurnRecord",
    "add_turn",
    "create_conversation",
    "delete_conversations",
    "draft_text",
    "get_conversation",
    "list_conversations",
    "question_history",
    "turn_image",
]

#: the turns whose question and answer are the context of the next question (a stopped or
#: failed answer is shown in the transcript but not given to the model again)
HISTORY_STOP_REASONS = ("end", "eos", "max_new_tokens")


class ConversationNotFound(LookupError):
    """No such conversation (or turn): HTTP 404."""

    http_status = 404


@dataclass(frozen=True)
class TurnRecord:
    """A turn as read back (``has_image``: a synthetic PNG is stored with it)."""

    id: int
    at: datetime
    kind: str
    question: str
    answer: str
    audience: str | None
    stop_reason: str
    dropped_turns: int
    prompt_tokens: int
    new_tokens: int
    timings: dict[str, Any] | None
    has_image: bool


@dataclass(frozen=True)
class ConversationRecord:
    """A conversation with its turns, oldest first."""

    id: int
    created_at: datetime
    updated_at: datetime
    actor: str
    study_uid: str | None
    sop_instance_uid: str | None
    source: str
    image_codes: list[int]
    model_name: str
    model_version: str
    demo: bool
    turns: list[TurnRecord]


@dataclass(frozen=True)
class ConversationSummary:
    """A conversation in a list: who, when, about what, how many turns (no text)."""

    id: int
    created_at: datetime
    updated_at: datetime
    actor: str
    study_uid: str | None
    source: str
    model_name: str
    model_version: str
    demo: bool
    turn_count: int


def _turn(t: ConversationTurn) -> TurnRecord:
    return read_model(TurnRecord, t, has_image=t.image_png is not None)


def create_conversation(
    session: Session,
    *,
    actor: str,
    source: str,
    image_codes: Sequence[int],
    model_name: str,
    model_version: str,
    demo: bool,
    study_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> int:
    """Store a new conversation (audited ``conversation.start``). Commits; returns its id."""
    if source not in ("study", "upload"):
        raise ValueError(f"source must be study or upload, got {source!r}")

    def work() -> int:
        now = utcnow()
        conv = Conversation(
            created_at=now,
            updated_at=now,
            actor=actor,
            study_uid=study_uid,
            sop_instance_uid=sop_instance_uid,
            source=source,
            image_codes=[int(c) for c in image_codes],
            model_name=model_name,
            model_version=model_version,
            demo=demo,
        )
        session.add(conv)
        session.flush()
        add_audit(
            session,
            actor=actor,
            action="conversation.start",
            target=f"conversation:{conv.id}",
            detail={"source": source, "study": study_uid, "sop": sop_instance_uid},
            now=now,
        )
        return conv.id

    return in_transaction(session, work)


def get_conversation(session: Session, conversation_id: int) -> ConversationRecord:
    """The conversation with its turns.

    Raises
    ------
    ConversationNotFound
        For an unknown id.
    """
    conv = session.get(Conversation, conversation_id)
    if conv is None:
        raise ConversationNotFound(f"conversation {conversation_id} not found")
    return read_model(
        ConversationRecord,
        conv,
        image_codes=[int(c) for c in conv.image_codes],
        turns=[_turn(t) for t in conv.turns],
    )


def list_conversations(
    session: Session, *, actor: str | None, limit: int = 50, offset: int = 0
) -> tuple[list[ConversationSummary], int]:
    """Conversations, the most recently updated first: ``actor``'s, or everyone's when
    ``actor`` is ``None``; one page and the total count."""
    where = [] if actor is None else [Conversation.actor == actor]
    turns = (
        select(func.count(ConversationTurn.id))
        .where(ConversationTurn.conversation_id == Conversation.id)
        .correlate(Conversation)
        .scalar_subquery()
    )
    rows, total = page(
        session,
        select(Conversation, turns).where(*where),
        order_by=(Conversation.updated_at.desc(), Conversation.id.desc()),
        limit=limit,
        offset=offset,
    )
    out = [read_model(ConversationSummary, c, turn_count=int(n or 0)) for c, n in rows]
    return out, total


def question_history(session: Session, conversation_id: int) -> list[tuple[str, str]]:
    """``(question, answer)`` of the conversation's answered questions, oldest first (the
    model's context; stopped and failed answers, summaries and images are left out)."""
    rows = session.execute(
        select(ConversationTurn.question, ConversationTurn.answer)
        .where(
            ConversationTurn.conversation_id == conversation_id,
            ConversationTurn.kind == "question",
            ConversationTurn.stop_reason.in_(HISTORY_STOP_REASONS),
        )
        .order_by(ConversationTurn.id)
    )
    return [(str(q), str(a)) for q, a in rows]


def add_turn(
    session: Session,
    conversation_id: int,
    *,
    actor: str,
    kind: str,
    question: str,
    answer: str,
    stop_reason: str,
    audience: str | None = None,
    dropped_turns: int = 0,
    prompt_tokens: int = 0,
    new_tokens: int = 0,
    timings: dict[str, Any] | None = None,
    image_png: bytes | None = None,
) -> TurnRecord:
    """Store a turn and its audit row (``conversation.<turn|summary|image>``). Commits.

    Raises
    ------
    ConversationNotFound
        When the conversation is gone (purged meanwhile).
    """
    action = {"question": "turn", "summary": "summary", "image": "image"}.get(kind)
    if action is None:
        raise ValueError(f"kind must be question, summary or image, got {kind!r}")

    def work() -> TurnRecord:
        conv = session.get(Conversation, conversation_id)
        if conv is None:
            raise ConversationNotFound(f"conversation {conversation_id} not found")
        now = utcnow()
        turn = ConversationTurn(
            conversation_id=conversation_id,
            at=now,
            kind=kind,
            question=question,
            answer=answer,
            audience=audience,
            stop_reason=stop_reason,
            dropped_turns=dropped_turns,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            timings=timings,
            image_png=image_png,
        )
        session.add(turn)
        conv.updated_at = now
        session.flush()
        detail: dict[str, Any] = {
            "turn": turn.id,
            "stop_reason": stop_reason,
            "new_tokens": new_tokens,
        }
        if dropped_turns:
            detail["dropped_turns"] = dropped_turns
        if audience:
            detail["audience"] = audience
        add_audit(
            session,
            actor=actor,
            action=f"conversation.{action}",
            target=f"conversation:{conversation_id}",
            detail=detail,
            now=now,
        )
        return _turn(turn)

    return in_transaction(session, work)


def turn_image(session: Session, conversation_id: int, turn_id: int) -> bytes:
    """The synthetic PNG of an ``image`` turn.

    Raises
    ------
    ConversationNotFound
        When there is no such turn in the conversation, or it has no image.
    """
    png = session.scalar(
        select(ConversationTurn.image_png).where(
            ConversationTurn.id == turn_id, ConversationTurn.conversation_id == conversation_id
        )
    )
    if png is None:
        raise ConversationNotFound(f"turn {turn_id} of conversation {conversation_id} has no image")
    return bytes(png)


def delete_conversations(
    session: Session, *, older_than: datetime, study_uids: Sequence[str] = ()
) -> int:
    """Delete conversations not updated since ``older_than``, and those about the studies
    ``study_uids`` (being purged), with their turns. Runs in the caller's transaction (no
    commit); returns how many conversations were deleted."""
    cond = Conversation.updated_at < older_than
    if study_uids:
        cond = or_(cond, Conversation.study_uid.in_(list(study_uids)))
    ids = list(session.scalars(select(Conversation.id).where(cond)))
    if not ids:
        return 0
    # children first (no reliance on ON DELETE CASCADE being enforced)
    session.execute(
        delete(ConversationTurn)
        .where(ConversationTurn.conversation_id.in_(ids))
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(Conversation)
        .where(Conversation.id.in_(ids))
        .execution_options(synchronize_session=False)
    )
    return len(ids)


def draft_text(
    session: Session, *, job_id: int | None = None, study_uid: str | None = None
) -> str | None:
    """The latest report draft's text of job ``job_id``, or of the latest job of study
    ``study_uid`` that is done and has one; ``None`` when there is none. A withdrawn draft
    must not be used: a withdrawn job's draft is none, and the study's is that of its latest
    job done and not withdrawn (as :func:`node.db.finals.draft_for` takes it: a later job
    that stored its draft and then failed, or is still running, sent none)."""
    stmt = (
        select(Draft.full_text)
        .join(Job, Job.id == Draft.job_id)
        .where(Draft.task == "report", Job.withdrawn_at.is_(None))
    )
    if job_id is not None:
        stmt = stmt.where(Draft.job_id == job_id)
    elif study_uid is not None:  # the current draft: a job's that is done (its objects out)
        stmt = stmt.join(Study, Study.id == Job.study_id)
        stmt = stmt.where(Study.study_instance_uid == study_uid, Job.state == JobState.done)
    else:
        return None
    text = session.scalar(stmt.order_by(Job.id.desc(), Draft.id.desc()).limit(1))
    return None if text is None else str(text)
