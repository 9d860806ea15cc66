"""Final reports received for drafted studies, with their agreement scores."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from node.db.models.base import UID_LEN, Base, enum_column
from node.db.models.states import FinalSource

__all__ = ["FinalReport"]


class FinalReport(Base):
    """A radiologist's final report of a study, and how the node's draft compares with it.

    Matched to the study's latest report draft by Study Instance UID or accession number
    (``job_id``, ``draft_id``); unmatched until a draft exists. The concordance columns are
    filled when matched (``models.concordance``; labels as ``{observation: label}``).
    Report text: never logged.
    """

    __tablename__ = "final_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[FinalSource] = mapped_column(enum_column(FinalSource, "final_source"))
    # SOP Instance UID, or the HL7 sending application, facility and message control ID
    # (MSH-3|MSH-4|MSH-10; a longer one than 200 characters as "sha256:" and its digest)
    object_uid: Mapped[str] = mapped_column(String(200))
    sender: Mapped[str | None] = mapped_column(String(128))
    study_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    verified: Mapped[bool] = mapped_column(Boolean, default=True)
    findings: Mapped[str | None] = mapped_column(Text)
    impression: Mapped[str | None] = mapped_column(Text)
    full_text: Mapped[str] = mapped_column(Text)
    signed_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(index=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    draft_id: Mapped[int | None] = mapped_column(ForeignKey("drafts.id", ondelete="SET NULL"))
    matched_at: Mapped[datetime | None]
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    draft_labels: Mapped[dict[str, Any] | None]
    final_labels: Mapped[dict[str, Any] | None]
    agreement: Mapped[float | None] = mapped_column(Float)
    discrepancies: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    significant: Mapped[bool] = mapped_column(Boolean, default=False)
    bleu4: Mapped[float | None] = mapped_column(Float)
    rouge_l: Mapped[float | None] = mapped_column(Float)
    turnaround_s: Mapped[float | None] = mapped_column(Float)
    # a review at the node: accept, edit or reject, and the reason of a rejection
    review_decision: Mapped[str | None] = mapped_column(String(16))
    review_reason: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (UniqueConstraint("source", "object_uid"),)
