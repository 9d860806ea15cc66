"""Conversations about a chest X-ray (#27): ``conversations`` (one image, kept only as its
256 VQ-GAN codes, with who started it and the model) and ``conversation_turns`` (questions
and answers, plain-language summaries, synthetic images as PNG). Text: never logged;
purged by retention with the studies.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("image_codes", sa.JSON(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
    )
    op.create_index("ix_conversations_updated_at", "conversations", ["updated_at"])
    op.create_index("ix_conversations_actor", "conversations", ["actor"])
    op.create_index("ix_conversations_study_uid", "conversations", ["study_uid"])
    op.create_table(
        "conversation_turns",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "conversation_id",
            sa.Integer(),
            sa.ForeignKey(
                "conversations.id",
                ondelete="CASCADE",
                name="fk_conversation_turns_conversation_id_conversations",
            ),
            nullable=False,
        ),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("audience", sa.String(16), nullable=True),
        sa.Column("stop_reason", sa.String(16), nullable=False),
        sa.Column("dropped_turns", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("new_tokens", sa.Integer(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("image_png", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_conversation_turns"),
    )
    op.create_index(
        "ix_conversation_turns_conversation_id", "conversation_turns", ["conversation_id"]
    )


def downgrade() -> None:
    op.drop_table("conversation_turns")
    op.drop_table("conversations")
