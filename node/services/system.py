"""The System page's figures: disks and the refuse threshold, database, retention, activity,
model, component health, and the audit log with filters (admin).

Read-only: nothing here changes the node. Figures come from the file systems
(``statvfs``), the database (:mod:`node.db.system_views`, :mod:`node.db.views`,
:mod:`node.db.audit`), the model host and :func:`node.services.health.readiness`; none
carries patient data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

import node
from node.db import audit as audit_db
from node.db import system_views
from node.db import views as views_db
from node.jsonable import to_jsonable
from node.runtime.spool import INCOMING, OUTPUTS_DIR
from node.services.context import ServiceContext
from node.services.health import readiness

__all__ = [
    "DatabaseInfo",
    "DiskUse",
    "HealthCheck",
    "ModelState",
    "RetentionState",
    "SystemReport",
    "audit_actions",
    "disk_use",
    "model_state",
    "process_started",
    "system_report",
]

MIB = 1 << 20
#: how the retention chore runs (:mod:`node.runtime.scheduler`, :mod:`node.db.retention`)
RETENTION_SCHEDULE = (
    "hourly in cxr-node serve (first run 60 s after start), up to 500 studies a run"
)
_IMPORTED = datetime.now(UTC)


@dataclass(frozen=True)
class DiskUse:
    """One folder the node writes to and its file system's space.

    Parameters
    ----------
    label
        ``spool``, ``staging`` (``<spool>/.incoming``), ``outputs`` or ``database`` (the
        SQLite file's folder).
    path
        The folder.
    exists
        Whether it exists (``outputs`` appears with the first SR); when not, the figures are
        ``None`` and ingest does not check it.
    total_bytes, used_bytes, free_bytes
        The file system's size, space in use, and space available to the node
        (``f_bavail``: what ingest compares with the floor).
    floor_bytes
        The refuse threshold, ``min_free_disk_mb`` in bytes.
    refuses
        Whether ingest refuses instances now because of this file system (free below the
        floor: C-STORE status 0xA700).
    same_as
        The label of an earlier folder on the same file system, if any.
    """

    label: str
    path: str
    exists: bool
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    floor_bytes: int
    refuses: bool
    same_as: str | None = None

    @property
    def full_fraction(self) -> float | None:
        """The share of the file system not available to the node, ``(total - free) /
        total``: space in use plus space reserved for root or taken by quotas (``None``
        without figures). Ingest refuses once it passes :attr:`floor_fraction`."""
        if not self.total_bytes or self.free_bytes is None:
            return None
        return min(1.0, max(0.0, (self.total_bytes - self.free_bytes) / self.total_bytes))

    @property
    def floor_fraction(self) -> float | None:
        """Where the refuse threshold lies on the bar: ``(total - floor) / total``, the use
        at which free space reaches the floor (``None`` without figures)."""
        if not self.total_bytes:
            return None
        return max(0.0, (self.total_bytes - self.floor_bytes) / self.total_bytes)


@dataclass(frozen=True)
class DatabaseInfo:
    """The database: backend, URL without password, file (SQLite) and size in bytes."""

    backend: str
    url: str
    file: str | None
    size_bytes: int | None
    schema_revision: str | None = None


@dataclass(frozen=True)
class RetentionState:
    """Retention settings and the newest purge (``retention.purge`` in the audit log).

    ``cutoff`` is the time before which studies are purged now (``None`` when
    ``retention_days`` is 0: everything kept); ``oldest_study_at`` the oldest
    ``last_received_at`` still kept; ``last_purge`` the purge's counts (``studies``,
    ``instances``, ``srs``, ``older_than``). A run that found nothing to delete is not
    recorded. ``receive_log_days`` and ``last_receive_log_purge*`` are the same for the
    receive log (``retention.receive_log``; ``associations``, ``refused_instances``).
    """

    retention_days: int
    enabled: bool
    schedule: str
    cutoff: datetime | None
    oldest_study_at: datetime | None
    last_purge_at: datetime | None
    last_purge: dict[str, Any] | None
    receive_log_days: int | None = None
    last_receive_log_purge_at: datetime | None = None
    last_receive_log_purge: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelState:
    """The model as this process holds it, with its warm-up.

    ``state`` is ``none`` (no model host in this process), ``loading``, ``ready`` (loaded
    and, with ``warmup``, warmed up by one tiny report) or ``error``; ``loaded_at`` and
    ``load_seconds`` cover load plus warm-up.
    """

    state: str
    name: str | None = None
    version: str | None = None
    demo: bool = False
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    quant: str | None = None
    engine_version: str | None = None
    warmup: bool | None = None
    loaded_at: datetime | None = None
    load_seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class HealthCheck:
    """One readiness check (:func:`node.services.health.readiness`): ``model``,
    ``database`` or ``spool``."""

    name: str
    ok: bool
    reason: str | None


@dataclass(frozen=True)
class SystemReport:
    """Everything the System page and ``GET /api/system`` show.

    Parameters
    ----------
    version
        The node's version (``node.__version__``).
    generated_at
        When the report was made (UTC).
    started_at, uptime_seconds
        When this process started, and for how long it has run.
    min_free_disk_mb
        The refuse threshold as configured.
    ingest_refuses
        Whether ingest refuses instances now (any watched file system below the floor).
    disks
        The folders the node writes to (:class:`DiskUse`).
    spool_dir, spool_bytes, instances
        The spool folder, the recorded size of the instances in it, and their number.
    database
        :class:`DatabaseInfo`.
    retention
        :class:`RetentionState`.
    activity
        Instances received and jobs finished per hour, oldest first (last 24 h).
    jobs, studies, deliveries
        Counts by state now.
    model
        :class:`ModelState`.
    ready, health
        Readiness and its checks.
    """

    version: str
    generated_at: datetime
    started_at: datetime
    uptime_seconds: float
    min_free_disk_mb: int
    ingest_refuses: bool
    disks: list[DiskUse]
    spool_dir: str
    spool_bytes: int
    instances: int
    database: DatabaseInfo
    retention: RetentionState
    activity: list[system_views.HourCount]
    jobs: dict[str, int]
    studies: dict[str, int]
    deliveries: dict[str, int]
    model: ModelState
    ready: bool
    health: list[HealthCheck] = field(default_factory=list)

    @property
    def activity_totals(self) -> dict[str, int]:
        """The activity summed over its hours: ``instances``, ``jobs_done``,
        ``jobs_failed``."""
        return {
            "instances": sum(h.instances for h in self.activity),
            "jobs_done": sum(h.jobs_done for h in self.activity),
            "jobs_failed": sum(h.jobs_failed for h in self.activity),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (datetimes as ISO 8601), with the activity's totals."""
        data: dict[str, Any] = to_jsonable(self)
        for disk, out in zip(self.disks, data["disks"], strict=True):
            out["full_fraction"] = disk.full_fraction
            out["floor_fraction"] = disk.floor_fraction
        data["activity_totals"] = self.activity_totals
        return data


@cache
def process_started() -> datetime:
    """When this process started (Linux ``/proc``; elsewhere when this module was loaded)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/stat", encoding="ascii") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return datetime.fromtimestamp(btime + ticks / os.sysconf("SC_CLK_TCK"), UTC)
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def _sqlite_folder(database_url: str) -> Path | None:
    path = system_views.sqlite_file(database_url)
    return None if path is None else path.parent


def disk_use(folders: dict[str, Path], floor_bytes: int) -> list[DiskUse]:
    """Space of each folder's file system, and whether ingest refuses because of it.

    Parameters
    ----------
    folders
        Label -> folder, in order (as ingest checks them, :meth:`Spool.watched`).
    floor_bytes
        The refuse threshold in bytes.
    """
    out: list[DiskUse] = []
    devices: dict[int, str] = {}
    for label, folder in folders.items():
        try:
            st = os.stat(folder)
            vfs = os.statvfs(folder)
        except OSError:
            out.append(DiskUse(label, str(folder), False, None, None, None, floor_bytes, False))
            continue
        total = vfs.f_blocks * vfs.f_frsize
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        free = vfs.f_bavail * vfs.f_frsize
        same = devices.get(st.st_dev)
        devices.setdefault(st.st_dev, label)
        out.append(
            DiskUse(
                label=label,
                path=str(folder),
                exists=True,
                total_bytes=int(total),
                used_bytes=int(used),
                free_bytes=int(free),
                floor_bytes=floor_bytes,
                refuses=free < floor_bytes,
                same_as=same,
            )
        )
    return out


def model_state(ctx: ServiceContext) -> ModelState:
    """The model host's state and warm-up (``none`` when this process has no model)."""
    host = ctx.host()
    if host is None:
        return ModelState(state="none")
    try:
        info = dict(host.info() or {})
    except Exception as exc:  # a broken host must not take the page down
        return ModelState(state="error", error=type(exc).__name__)
    error = info.get("error")
    if bool(getattr(host, "ready", False)):
        state = "ready"
    elif error:
        state = "error"
    else:
        state = "loading"
    loaded = info.get("loaded_at")
    load_s = info.get("load_seconds")

    def opt(key: str) -> str | None:
        value = info.get(key)
        return None if value is None else str(value)

    return ModelState(
        state=state,
        name=opt("model_name"),
        version=opt("model_version"),
        demo=bool(info.get("demo")),
        backend=opt("backend"),
        device=opt("device"),
        dtype=opt("dtype"),
        quant=opt("quant"),
        engine_version=opt("engine_version"),
        warmup=getattr(host, "warmup", None),
        loaded_at=datetime.fromisoformat(loaded) if isinstance(loaded, str) else None,
        load_seconds=float(load_s) if isinstance(load_s, int | float) else None,
        error=None if error is None else str(error),
    )


def _schema_revision(session: Session) -> str | None:
    try:
        return session.scalar(text("SELECT version_num FROM alembic_version"))
    except Exception:  # no schema yet, or not readable: the page still shows the rest
        session.rollback()
        return None


def system_report(ctx: ServiceContext, *, now: datetime | None = None) -> SystemReport:
    """Gather the System page's figures (admin; no patient data).

    Parameters
    ----------
    ctx
        The services' context.
    now
        The current time (default: now, UTC).
    """
    settings = ctx.settings
    now = now or datetime.now(UTC)
    floor = settings.min_free_disk_mb * MIB
    spool = Path(settings.spool_dir).absolute()
    folders = {"spool": spool, "staging": spool / INCOMING, "outputs": spool / OUTPUTS_DIR}
    db_folder = _sqlite_folder(settings.database_url)
    if db_folder is not None:
        folders["database"] = db_folder
    disks = disk_use(folders, floor)
    days = settings.retention_days
    with ctx.read_sessions() as session:
        counts = views_db.counts(session)
        activity = system_views.hourly_activity(session, now=now)
        size = system_views.database_size(session, settings.database_url)
        purge = system_views.last_purge(session)
        log_purge = system_views.last_purge(session, system_views.RECEIVE_LOG_PURGE_ACTION)
        oldest = system_views.oldest_study(session)
        revision = _schema_revision(session)
    sqlite = system_views.sqlite_file(settings.database_url)
    ready, checks = readiness(ctx)
    started = process_started()
    return SystemReport(
        version=node.__version__,
        generated_at=now,
        started_at=started,
        uptime_seconds=max(0.0, (now - started).total_seconds()),
        min_free_disk_mb=settings.min_free_disk_mb,
        ingest_refuses=any(d.refuses for d in disks),
        disks=disks,
        spool_dir=str(spool),
        spool_bytes=counts.spool_bytes,
        instances=counts.instances,
        database=DatabaseInfo(
            backend=settings.database_backend,
            url=settings.public_database_url,
            file=None if sqlite is None else str(sqlite),
            size_bytes=size,
            schema_revision=revision,
        ),
        retention=RetentionState(
            retention_days=days,
            enabled=days > 0,
            schedule=RETENTION_SCHEDULE,
            cutoff=now - timedelta(days=days) if days > 0 else None,
            oldest_study_at=oldest,
            last_purge_at=None if purge is None else purge.at,
            last_purge=None if purge is None else purge.detail,
            receive_log_days=getattr(settings, "receive_log_days", None),
            last_receive_log_purge_at=None if log_purge is None else log_purge.at,
            last_receive_log_purge=None if log_purge is None else log_purge.detail,
        ),
        activity=activity,
        jobs=counts.jobs,
        studies=counts.studies_by_state,
        deliveries=counts.deliveries,
        model=model_state(ctx),
        ready=ready,
        health=[
            HealthCheck(name, bool(c.get("ok")), c.get("reason")) for name, c in checks.items()
        ],
    )


def audit_actions(ctx: ServiceContext) -> list[str]:
    """The actions present in the audit log (the filter's choices)."""
    with ctx.read_sessions() as session:
        return audit_db.audit_actions(session)
