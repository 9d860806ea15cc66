"""Final reports that come back from the radiologist, with their concordance to the draft.

``final_reports``: one row per received final report (DICOM SR or PDF, HL7 ORU), unique on
(``source``, ``object_uid``); ``job_id`` / ``draft_id`` once matched to the study's draft;
the per-pair labels, agreement, discrepancies, BLEU-4, ROUGE-L and turnaround.
``studies.accession_number``: the Accession Number (0008,0050) of the study's instances,
to match a final report that carries no Study Instance UID. ``api_tokens.role`` also
``reviewer`` (a radiologist who reviews drafts at the node; ``final_reports.source``
``review``, ``review_decision``, ``review_reason``). ``deliveries.object`` also
``coded-sr`` (the draft's CheXpert observations coded, TID 1500).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("accession_number", sa.String(16), nullable=True))
        batch.create_index("ix_studies_accession_number", ["accession_number"])
    op.create_table(
        "final_reports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "source",
            sa.Enum(
                "dicom-sr",
                "dicom-pdf",
                "hl7",
                "review",
                name="final_source",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("object_uid", sa.String(200), nullable=False),
        sa.Column("sender", sa.String(128), nullable=True),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("findings", sa.Text(), nullable=True),
        sa.Column("impression", sa.Text(), nullable=True),
        sa.Column("full_text", sa.Text(), nullable=False),
        sa.Column("signed_at", TS, nullable=True),
        sa.Column("received_at", TS, nullable=False),
        sa.Column(
            "job_id",
            sa.Integer(),
            sa.ForeignKey("jobs.id", ondelete="CASCADE", name="fk_final_reports_job_id_jobs"),
            nullable=True,
        ),
        sa.Column(
            "draft_id",
            sa.Integer(),
            sa.ForeignKey(
                "drafts.id", ondelete="SET NULL", name="fk_final_reports_draft_id_drafts"
            ),
            nullable=True,
        ),
        sa.Column("matched_at", TS, nullable=True),
        sa.Column("model_name", sa.String(128), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("draft_labels", sa.JSON(), nullable=True),
        sa.Column("final_labels", sa.JSON(), nullable=True),
        sa.Column("agreement", sa.Float(), nullable=True),
        sa.Column("discrepancies", sa.JSON(), nullable=True),
        sa.Column("significant", sa.Boolean(), nullable=False),
        sa.Column("bleu4", sa.Float(), nullable=True),
        sa.Column("rouge_l", sa.Float(), nullable=True),
        sa.Column("turnaround_s", sa.Float(), nullable=True),
        sa.Column("review_decision", sa.String(16), nullable=True),
        sa.Column("review_reason", sa.String(256), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_final_reports"),
        sa.UniqueConstraint("source", "object_uid", name="uq_final_reports_source_object_uid"),
    )
    op.create_index("ix_final_reports_study_uid", "final_reports", ["study_uid"])
    op.create_index("ix_final_reports_accession_number", "final_reports", ["accession_number"])
    op.create_index("ix_final_reports_received_at", "final_reports", ["received_at"])
    op.create_index("ix_final_reports_job_id", "final_reports", ["job_id"])
    with op.batch_alter_table("deliveries", recreate="always") as batch:
        batch.alter_column(
            "object",
            existing_type=_object(*OBJECTS),
            type_=_object(*OBJECTS, "coded-sr"),
            existing_nullable=False,
            existing_server_default="sr",
        )
    with op.batch_alter_table("api_tokens") as batch:
        batch.alter_column(
            "role",
            existing_type=_role("viewer", "operator", "admin"),
            type_=_role("viewer", "operator", "admin", "reviewer"),
            existing_nullable=False,
        )


OBJECTS = ("sr", "basic-sr", "pdf", "report", "withdrawal", "sc")


def _object(*values: str) -> sa.Enum:
    return sa.Enum(
        *values, name="delivery_object", native_enum=False, create_constraint=True, length=16
    )


def _role(*values: str) -> sa.Enum:
    return sa.Enum(*values, name="api_role", native_enum=False, create_constraint=True, length=16)


def downgrade() -> None:
    op.execute("UPDATE api_tokens SET revoked_at = CURRENT_TIMESTAMP WHERE role = 'reviewer'")
    op.execute("UPDATE api_tokens SET role = 'viewer' WHERE role = 'reviewer'")
    with op.batch_alter_table("api_tokens") as batch:
        batch.alter_column(
            "role",
            existing_type=_role("viewer", "operator", "admin", "reviewer"),
            type_=_role("viewer", "operator", "admin"),
            existing_nullable=False,
        )
    op.execute("DELETE FROM deliveries WHERE object = 'coded-sr'")
    with op.batch_alter_table("deliveries", recreate="always") as batch:
        batch.alter_column(
            "object",
            existing_type=_object(*OBJECTS, "coded-sr"),
            type_=_object(*OBJECTS),
            existing_nullable=False,
            existing_server_default="sr",
        )
    op.drop_table("final_reports")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_accession_number")
        batch.drop_column("accession_number")
