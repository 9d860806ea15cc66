"""Conversations with the model and their turns."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from node.db.models.base import UID_LEN, Base

__all__ = ["Conversation", "ConversationTurn"]


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
