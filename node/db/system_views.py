"""Read models of the System page: activity per hour, the database's size, the last purge.

Portable across SQLite and PostgreSQL: the hour of a timestamp is cut in SQL by each
dialect's own function (``strftime`` on SQLite, where times are stored as naive UTC text;
``date_trunc`` on the UTC time on PostgreSQL) and read back as ``YYYY-MM-DD HH`` text, so the
grouping happens in the database and only 24 rows per series come back.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from node.db.models import AuditLog, Instance, Job, JobState, Study

__all__ = [
    "HourCount",
    "PurgeEntry",
    "database_size",
    "hour_floor",
    "hourly_activity",
    "last_purge",
    "oldest_study",
    "sqlite_file",
]

PURGE_ACTION = "retention.purge"
"""The audit action of one retention purge of studies (:mod:`node.db.retention`)."""
RECEIVE_LOG_PURGE_ACTION = "retention.receive_log"
"""The audit action of one purge of the receive log (:mod:`node.db.retention`)."""

_HOUR_TEXT = "%Y-%m-%d %H"


@dataclass(frozen=True)
class HourCount:
    """What happened in one hour (UTC): instances received, jobs finished.

    Parameters
    ----------
    hour
        Start of the hour, timezone-aware UTC.
    instances
        Instances received in that hour (``instances.received_at``) and still recorded.
    jobs_done, jobs_failed
        Jobs that finished ``done`` or ``failed`` in that hour (``jobs.finished_at``), as
        they stand now (a job retried since then counts where it finished last).
    """

    hour: datetime
    instances: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0


@dataclass(frozen=True)
class PurgeEntry:
    """A retention purge: when, and its counts as audited (studies: ``studies``,
    ``instances``, ``srs``, ``older_than``; receive log: ``associations``,
    ``refused_instances``, ``older_than``)."""

    at: datetime
    detail: dict[str, Any]


def hour_floor(at: datetime) -> datetime:
    """``at`` in UTC with minutes, seconds and microseconds cut off."""
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hour_key(session: Session, column: Any) -> Any:
    """The SQL expression of ``column``'s hour as ``YYYY-MM-DD HH`` text (UTC)."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return func.strftime(_HOUR_TEXT, column)
    if dialect == "postgresql":
        return func.to_char(
            func.date_trunc("hour", func.timezone("UTC", column)), "YYYY-MM-DD HH24"
        )
    raise NotImplementedError(f"hourly counts on {dialect} are not supported")


def _per_hour(session: Session, column: Any, since: datetime, *conds: Any) -> dict[datetime, int]:
    key = _hour_key(session, column).label("hour")
    rows = session.execute(
        select(key, func.count()).where(column >= since, *conds).group_by(key)
    ).all()
    out: dict[datetime, int] = {}
    for hour, n in rows:
        if hour is None:
            continue
        out[datetime.strptime(str(hour), _HOUR_TEXT).replace(tzinfo=UTC)] = int(n)
    return out


def hourly_activity(session: Session, *, now: datetime, hours: int = 24) -> list[HourCount]:
    """Instances received and jobs finished per hour over the last ``hours`` hours.

    Parameters
    ----------
    session
        A (read) session.
    now
        The current time (aware); the newest bucket is the hour holding it.
    hours
        How many one-hour buckets, 1..168.

    Returns
    -------
    list of HourCount
        One per hour, oldest first, zeros included.
    """
    if not 1 <= hours <= 168:
        raise ValueError(f"hours must be within 1..168, got {hours}")
    first = hour_floor(now) - timedelta(hours=hours - 1)
    instances = _per_hour(session, Instance.received_at, first)
    done = _per_hour(session, Job.finished_at, first, Job.state == JobState.done)
    failed = _per_hour(session, Job.finished_at, first, Job.state == JobState.failed)
    out = []
    for k in range(hours):
        at = first + timedelta(hours=k)
        out.append(
            HourCount(
                hour=at,
                instances=instances.get(at, 0),
                jobs_done=done.get(at, 0),
                jobs_failed=failed.get(at, 0),
            )
        )
    return out


def sqlite_file(database_url: str) -> Path | None:
    """The SQLite database file of ``database_url`` (absolute), or ``None`` for another
    backend, an in-memory database or a ``file:`` URI."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).absolute()


def database_size(session: Session, database_url: str) -> int | None:
    """The database's size in bytes.

    SQLite: the database file plus its ``-wal`` file (committed pages not yet checkpointed);
    PostgreSQL: ``pg_database_size(current_database())``. ``None`` when it cannot be known
    (in-memory SQLite, a file that cannot be read).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return int(session.scalar(text("SELECT pg_database_size(current_database())")) or 0)
    path = sqlite_file(database_url)
    if path is None:
        return None
    total = 0
    try:
        total += os.stat(path).st_size
    except OSError:
        return None
    with contextlib.suppress(OSError):  # no WAL file: everything is in the database file
        total += os.stat(path.with_name(path.name + "-wal")).st_size
    return total


def last_purge(session: Session, action: str = PURGE_ACTION) -> PurgeEntry | None:
    """The newest purge audited as ``action`` (default ``retention.purge``), or ``None``
    when none was recorded."""
    row = session.scalars(
        select(AuditLog).where(AuditLog.action == action).order_by(AuditLog.id.desc())
    ).first()
    if row is None:
        return None
    return PurgeEntry(at=row.at, detail=dict(row.detail or {}))


def oldest_study(session: Session) -> datetime | None:
    """The oldest ``last_received_at`` of the studies kept (what retention purges next)."""
    return session.scalar(select(func.min(Study.last_received_at)))
