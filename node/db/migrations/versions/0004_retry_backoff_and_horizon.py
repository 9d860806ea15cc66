"""Back-off of job retries and the retry horizon of deliveries.

``jobs.not_before``: a job queued again after a transient failure is not claimed before it.
``deliveries.queued_at``: start of the current round of attempts (NULL: ``created_at``).
``deliveries.permanent_failure``: a failed delivery that retrying cannot fix; failed rows from
before are marked from their recorded reason (``permanent failure: ...``, ``SR file missing``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("not_before", sa.DateTime(timezone=True)))
    op.add_column("deliveries", sa.Column("queued_at", sa.DateTime(timezone=True)))
    op.add_column(
        "deliveries",
        sa.Column("permanent_failure", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    deliveries = sa.table(
        "deliveries",
        sa.column("state", sa.String),
        sa.column("last_error", sa.Text),
        sa.column("permanent_failure", sa.Boolean),
    )
    op.execute(
        deliveries.update()
        .where(
            deliveries.c.state == "failed",
            sa.or_(
                deliveries.c.last_error.like("permanent failure:%"),
                deliveries.c.last_error.like("SR file missing:%"),
            ),
        )
        .values(permanent_failure=sa.true())
    )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("permanent_failure")
        batch.drop_column("queued_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("not_before")
