"""System route: disks and the refuse threshold, database, retention, activity, model and
component health in one answer (admin). The audit log is ``GET /api/audit``
(:mod:`node.api.routes_admin`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from node.api.deps import AUTH_ERRORS, Admin, Ctx
from node.services import system as system_service

__all__ = ["router"]

router = APIRouter(prefix="/api", responses=AUTH_ERRORS)


@router.get("/system", tags=["node"], summary="Disks, database, retention, activity (admin)")
def system(ctx: Ctx, _p: Admin) -> dict[str, Any]:
    """:class:`node.services.system.SystemReport` as JSON: each folder the node writes to
    (spool, staging, outputs, the SQLite folder) with its file system's total, used and free
    bytes, the refuse threshold (``min_free_disk_mb``) and whether ingest refuses now; the
    database's size; retention settings and the last purge; instances received and jobs
    finished per hour over the last 24 h; the model's state and warm-up; the readiness
    checks; the node's version and uptime. No patient data."""
    return system_service.system_report(ctx).to_dict()
