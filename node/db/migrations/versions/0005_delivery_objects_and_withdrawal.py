"""Several objects per job and destination, HL7 and FHIR destinations, withdrawn drafts.

``deliveries.object``: what the row carries (``sr`` for every row from before);
``deliveries.object_uid``: its SOP Instance UID, MSH-10 or report identifier;
one row per (job, destination, object) instead of per (job, destination);
``deliveries.kind`` also ``hl7`` and ``fhir``; ``deliveries.state`` also ``cancelled``;
``deliveries.job_id`` may be NULL (a synthetic Secondary Capture sent on request);
``jobs.withdrawn_at`` / ``withdrawn_by`` / ``withdrawn_reason``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
OBJECTS = ("sr", "basic-sr", "pdf", "report", "withdrawal", "sc")


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("withdrawn_at", TS, nullable=True))
        batch.add_column(sa.Column("withdrawn_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("withdrawn_reason", sa.String(256), nullable=True))
    # SQLite: the table is rebuilt, the old CHECK constraints of the two enums replaced;
    # PostgreSQL: ALTER TABLE ... DROP/ADD CONSTRAINT
    with op.batch_alter_table("deliveries", recreate="always") as batch:
        batch.add_column(
            sa.Column("object", _enum("delivery_object", *OBJECTS), server_default="sr", nullable=False)
        )
        batch.add_column(sa.Column("object_uid", sa.String(64), nullable=True))
        batch.alter_column(
            "kind",
            existing_type=_enum("delivery_kind", "dimse", "stow"),
            type_=_enum("delivery_kind", "dimse", "stow", "hl7", "fhir"),
            existing_nullable=False,
        )
        batch.alter_column(
            "state",
            existing_type=_enum("delivery_state", "pending", "sent", "failed"),
            type_=_enum("delivery_state", "pending", "sent", "failed", "cancelled"),
            existing_nullable=False,
        )
        batch.alter_column("job_id", existing_type=sa.Integer(), nullable=True)
        batch.drop_constraint("uq_deliveries_job_id_destination", type_="unique")
        batch.create_unique_constraint(
            "uq_deliveries_job_id_destination_object", ["job_id", "destination", "object"]
        )


def downgrade() -> None:
    op.execute(
        "DELETE FROM deliveries WHERE object <> 'sr' OR job_id IS NULL OR kind IN ('hl7', 'fhir')"
    )
    op.execute("UPDATE deliveries SET state = 'failed' WHERE state = 'cancelled'")
    with op.batch_alter_table("deliveries", recreate="always") as batch:
        batch.drop_constraint("uq_deliveries_job_id_destination_object", type_="unique")
        batch.create_unique_constraint(
            "uq_deliveries_job_id_destination", ["job_id", "destination"]
        )
        batch.alter_column("job_id", existing_type=sa.Integer(), nullable=False)
        batch.alter_column(
            "state",
            existing_type=_enum("delivery_state", "pending", "sent", "failed", "cancelled"),
            type_=_enum("delivery_state", "pending", "sent", "failed"),
            existing_nullable=False,
        )
        batch.alter_column(
            "kind",
            existing_type=_enum("delivery_kind", "dimse", "stow", "hl7", "fhir"),
            type_=_enum("delivery_kind", "dimse", "stow"),
            existing_nullable=False,
        )
        batch.drop_column("object_uid")
        batch.drop_column("object")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("withdrawn_reason")
        batch.drop_column("withdrawn_by")
        batch.drop_column("withdrawn_at")
