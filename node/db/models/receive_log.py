"""The receive log: associations offered to the storage SCP and the instances it refused."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from node.db.models.base import AE_LEN, UID_LEN, Base

__all__ = ["Association", "RefusedInstance"]


class Association(Base):
    """One DICOM association offered to the storage SCP (the receive log, PS3.8 7.1).

    ``outcome``: ``open`` while it lasts, then ``released``, ``aborted`` or ``rejected``
    (A-ASSOCIATE-RJ, ``reason`` says why). ``accepted``/``refused`` count C-STORE requests
    answered with success (or warning) and with a failure status; ``statuses`` counts them
    by status (``{"0xA900": 2}``).
    """

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(index=True)
    ended_at: Mapped[datetime | None]
    calling_ae: Mapped[str | None] = mapped_column(String(AE_LEN), index=True)
    called_ae: Mapped[str | None] = mapped_column(String(AE_LEN))
    address: Mapped[str | None] = mapped_column(String(64))
    port: Mapped[int | None] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    outcome: Mapped[str] = mapped_column(String(16), default="open")
    reason: Mapped[str | None] = mapped_column(String(256))
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    statuses: Mapped[dict[str, Any] | None]


class RefusedInstance(Base):
    """A C-STORE request the node refused: its status and reason, for the receive log."""

    __tablename__ = "refused_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime]
    study_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    sop_class_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(256))
