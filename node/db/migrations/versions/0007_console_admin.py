"""What the admin console shows: study identity, job history, the receive log, routing.

``studies.patient_name``, ``patient_id``, ``study_date``, ``modalities``: the study's
identity for search (patient data: never logged). ``jobs.rule``, ``model``,
``destinations``: the routing rule that made the job and what it chose. ``job_events``:
each job's history (received, queued, claimed, stages, drafted, delivery attempts,
operator actions). ``associations`` and ``refused_instances``: the receive log (every
association offered to the storage SCP, and each refused C-STORE with its status);
``instances.association_id`` links an instance to the association that delivered it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("patient_name", sa.String(200), nullable=True))
        batch.add_column(sa.Column("patient_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("study_date", sa.String(8), nullable=True))
        batch.add_column(sa.Column("modalities", sa.String(64), nullable=True))
        batch.create_index("ix_studies_patient_name", ["patient_name"])
        batch.create_index("ix_studies_patient_id", ["patient_id"])
        batch.create_index("ix_studies_study_date", ["study_date"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("rule", sa.String(64), nullable=True))
        batch.add_column(sa.Column("model", sa.String(128), nullable=True))
        batch.add_column(sa.Column("destinations", sa.JSON(), nullable=True))
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "job_id",
            sa.Integer(),
            sa.ForeignKey("jobs.id", ondelete="CASCADE", name="fk_job_events_job_id_jobs"),
            nullable=False,
        ),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(128), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_job_events"),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    op.create_index("ix_job_events_at", "job_events", ["at"])
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        sa.Column("called_ae", sa.String(16), nullable=True),
        sa.Column("address", sa.String(64), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("tls", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(256), nullable=True),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("refused", sa.Integer(), nullable=False),
        sa.Column("statuses", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_associations"),
    )
    op.create_index("ix_associations_started_at", "associations", ["started_at"])
    op.create_index("ix_associations_calling_ae", "associations", ["calling_ae"])
    op.create_table(
        "refused_instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "association_id",
            sa.Integer(),
            sa.ForeignKey(
                "associations.id",
                ondelete="CASCADE",
                name="fk_refused_instances_association_id_associations",
            ),
            nullable=True,
        ),
        sa.Column("at", TS, nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(256), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_refused_instances"),
    )
    op.create_index("ix_refused_instances_association_id", "refused_instances", ["association_id"])
    op.create_index("ix_refused_instances_study_uid", "refused_instances", ["study_uid"])
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("association_id", sa.Integer(), nullable=True))
        batch.create_index("ix_instances_association_id", ["association_id"])
        batch.create_foreign_key(
            "fk_instances_association_id_associations",
            "associations",
            ["association_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_constraint("fk_instances_association_id_associations", type_="foreignkey")
        batch.drop_index("ix_instances_association_id")
        batch.drop_column("association_id")
    op.drop_table("refused_instances")
    op.drop_table("associations")
    op.drop_table("job_events")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("destinations")
        batch.drop_column("model")
        batch.drop_column("rule")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_study_date")
        batch.drop_index("ix_studies_patient_id")
        batch.drop_index("ix_studies_patient_name")
        batch.drop_column("modalities")
        batch.drop_column("study_date")
        batch.drop_column("patient_id")
        batch.drop_column("patient_name")
