"""Studies, series and instances as received (PS3.3 C.7.2.1, C.7.3.1, C.12.1)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from node.db.models.base import AE_LEN, UID_LEN, Base, enum_column
from node.db.models.states import StudyState

if TYPE_CHECKING:
    from node.db.models.jobs import Job

__all__ = ["Instance", "Series", "Study"]


class Study(Base):
    """A study (Study Instance UID 0020,000D) as assembled from received instances."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    state: Mapped[StudyState] = mapped_column(
        enum_column(StudyState, "study_state"), default=StudyState.receiving
    )
    skip_reason: Mapped[str | None] = mapped_column(Text)
    study_description: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(AE_LEN))
    # Accession Number (0008,0050, SH): matches a final report without a Study Instance UID
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    # identity shown to admins in the console (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study);
    # patient data: searchable here, never logged. Patient's Name (0010,0010) as sent
    # (component groups joined by "="), Patient ID (0010,0020), Study Date (0008,0020) as
    # YYYYMMDD, and the modalities of the study's series joined by "\" (as (0008,0061)).
    patient_name: Mapped[str | None] = mapped_column(String(200), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    modalities: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    series_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    # start of the current receiving period (reset when a late instance reopens the study);
    # forced completion counts from here
    receiving_since: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    forced_completion: Mapped[bool] = mapped_column(Boolean, default=False)

    series: Mapped[list[Series]] = relationship(back_populates="study", passive_deletes=True)
    jobs: Mapped[list[Job]] = relationship(back_populates="study", passive_deletes=True)

    __table_args__ = (Index(None, "state", "last_received_at"),)


class Series(Base):
    """A series (Series Instance UID 0020,000E) of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    """A received SOP instance and where its file lies in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LEN))
    spool_path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime]
    calling_ae: Mapped[str | None] = mapped_column(String(AE_LEN))
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    replaced_count: Mapped[int] = mapped_column(Integer, default=0)
    # the association that delivered it (receive log); kept when the log row is purged
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), index=True
    )
