"""Readiness: the model warmed up, the database reachable, the spool writable with room."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import text

from node.services.context import ServiceContext
from node.settings import Settings

__all__ = ["readiness"]


def readiness(ctx: ServiceContext) -> tuple[bool, dict[str, Any]]:
    """Whether the node is ready: model warmed up, database and spool reachable.

    Returns
    -------
    tuple
        ``(ready, checks)`` where ``checks`` maps ``model``, ``database`` and ``spool`` to
        ``{"ok": bool, "reason": str | None, ...}``; the model's also names the model, the
        backend, its quantisation, the engine's version and (llama.cpp) the CPU features of
        its kernels.
    """
    checks: dict[str, Any] = {}
    host = ctx.host()
    if host is None:
        checks["model"] = {"ok": False, "reason": "no model host in this process (model_dir)"}
    else:
        info = host.info()
        reason = None
        if not host.ready:
            reason = host.error or ("model is loading" if info.get("loading") else "not loaded")
        checks["model"] = {
            "ok": bool(host.ready),
            "reason": reason,
            "model_name": info.get("model_name"),
            "model_version": info.get("model_version"),
            "demo": info.get("demo"),
            "backend": info.get("backend"),
            "quant": info.get("quant"),
            "engine_version": info.get("engine_version"),
            "cpu_features": info.get("cpu_features"),
        }
    try:
        with ctx.read_sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True, "reason": None}
    except Exception as exc:
        checks["database"] = {"ok": False, "reason": f"database unreachable: {type(exc).__name__}"}
    checks["spool"] = _spool_check(ctx.settings)
    return all(c["ok"] for c in checks.values()), checks


def _spool_check(settings: Settings) -> dict[str, Any]:
    spool = Path(settings.spool_dir)
    if not spool.is_dir():
        return {"ok": False, "reason": f"spool_dir {spool} does not exist"}
    try:
        free_mb = shutil.disk_usage(spool).free // (1024 * 1024)
    except OSError as exc:
        return {"ok": False, "reason": f"spool_dir {spool} unreadable: {exc.strerror}"}
    if not os.access(spool, os.W_OK):
        return {"ok": False, "reason": f"spool_dir {spool} is not writable"}
    if free_mb < settings.min_free_disk_mb:
        return {
            "ok": False,
            "reason": f"{free_mb} MB free under spool_dir, below min_free_disk_mb",
        }
    return {"ok": True, "reason": None, "free_mb": int(free_mb)}


# --- images -------------------------------------------------------------------------------
