"""The declarative base of the node's tables: naming convention, UTC timestamps, enum columns."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Dialect, Enum, MetaData, TypeDecorator
from sqlalchemy.orm import DeclarativeBase

__all__ = [
    "AE_LEN",
    "ID_MAX",
    "NAMING",
    "UID_LEN",
    "Base",
    "UTCDateTime",
    "enum_column",
    "utcnow",
]


UID_LEN = 64  # PS3.5 §9.1: a UID is at most 64 characters
AE_LEN = 16  # PS3.5 §6.2 VR AE
#: the largest id a row can have: the tables' Integer keys (PostgreSQL INTEGER, 32-bit); the
#: API's paths and bodies and the CLI's arguments take ids in 1..ID_MAX
ID_MAX = 2**31 - 1


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of time stored)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware.

    SQLite has no time zone type: values are stored as naive UTC there, so that string
    comparison in SQL orders them correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def enum_column(cls: type[enum.Enum], name: str) -> Enum:
    """A column type for the string enumeration ``cls``: stored by value as a short string
    with a CHECK constraint named ``name`` (no native database enum, so a new member needs
    only a migration of the constraint)."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention (stable constraint names for Alembic)."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }
