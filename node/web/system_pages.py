"""The console's System page (admin): disks with the refuse threshold, database, retention
and the last purge, instances and jobs per hour, model and warm-up, component health, and
the audit log with filters and paging (all on the server, no script).

Figures come from :func:`node.services.system.system_report`, the same as ``GET
/api/system``; the audit log from :func:`node.services.jobs.audit_entries`, the same as ``GET
/api/audit``. Viewers, operators and reviewers get the console's 403 page.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup, escape

from node.db.audit import AuditFilter
from node.services import jobs as job_service
from node.services import system as system_service
from node.web import charts, frame

__all__ = ["disk_bar", "fmt_bytes", "parse_time", "router"]

router = APIRouter(include_in_schema=False)

_BAR_W, _BAR_H = 320, 36
_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d")


def fmt_bytes(value: int | None) -> str:
    """Bytes in binary units with a no-break space (``1.5 GiB``); ``—`` for ``None``."""
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f}\u00a0{unit}" if unit == "B" else f"{size:.1f}\u00a0{unit}"
        size /= 1024
    return f"{size:.1f}\u00a0TiB"  # pragma: no cover - the loop always returns


def parse_time(value: str) -> datetime | None:
    """A form's time (``datetime-local`` or a date), read as UTC; ``None`` when empty or
    not a time."""
    value = value.strip()
    if not value:
        return None
    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def disk_bar(disk: system_service.DiskUse) -> Markup:
    """An SVG bar of a file system's use with the refuse threshold marked (no style
    attributes: the console's frame.CSP forbids inline styles; colours are presentation
    attributes)."""
    label = f"{disk.label} file system: space not available to the node"
    used = disk.full_fraction
    floor = disk.floor_fraction
    parts = [
        f'<svg class="disk-bar" width="{_BAR_W}" height="{_BAR_H}" '
        f'viewBox="0 0 {_BAR_W} {_BAR_H}" role="img" aria-label="{escape(label)}" '
        f'data-disk="{escape(disk.label)}">',
        f"<title>{escape(label)}</title>",
        f'<rect x="0" y="4" width="{_BAR_W}" height="16" fill="#e3e7ec"/>',
    ]
    if used is not None:
        colour = "#b3261e" if disk.refuses else "#1f5fa8"
        parts.append(
            f'<rect class="used" x="0" y="4" width="{_BAR_W * min(used, 1.0):.1f}" height="16" '
            f'fill="{colour}"/>'
        )
    if floor is not None:
        x = min(max(_BAR_W * floor, 1.0), _BAR_W - 1.0)  # the whole line inside the box
        anchor = "end" if floor > 0.5 else "start"
        dx = -4 if floor > 0.5 else 4
        parts.append(
            f'<line class="threshold" x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="24" '
            f'stroke="#9a6700" stroke-width="2"/>'
            f'<text x="{x + dx:.1f}" y="34" text-anchor="{anchor}" font-size="11" fill="#444">'
            f"refuse threshold {escape(fmt_bytes(disk.floor_bytes))} free</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _activity_chart(report: system_service.SystemReport) -> Markup:
    series: dict[str, dict[datetime, float | None]] = {
        "instances received": {},
        "jobs done": {},
        "jobs failed": {},
    }
    for h in report.activity:
        series["instances received"][h.hour] = h.instances
        series["jobs done"][h.hour] = h.jobs_done
        series["jobs failed"][h.hour] = h.jobs_failed
    top = max((v or 0 for s in series.values() for v in s.values()), default=0)
    top += top % 2  # even, at least 2: whole numbers on the axis (0, top / 2, top)
    return charts.line_chart(
        "Instances received and jobs finished per hour, last 24 h (UTC)",
        series,
        y_max=float(max(top, 2)),
        fmt=".0f",
        x_format="%H:00",
    )


@router.get("/system", name="web_system", response_class=HTMLResponse)
def system_page(
    request: Request,
    user: frame.PageUser,
    actor: Annotated[str, Query(max_length=128)] = "",
    action: Annotated[str, Query(max_length=64)] = "",
    target: Annotated[str, Query(max_length=256)] = "",
    since: Annotated[str, Query(max_length=32)] = "",
    until: Annotated[str, Query(max_length=32)] = "",
    page: frame.PageNo = 1,
    per: frame.PerPage = 50,
) -> Response:
    """Disks, database, retention, activity, model, health, and the audit log (admin)."""
    if user is None:
        return frame.login_redirect(request)
    if not user.has("admin"):
        return frame.render(
            request,
            "error.html",
            page="error",
            title="Forbidden",
            user=user,
            status_code=403,
            detail=f"The System page needs the admin role (yours: {user.role.value}).",
        )
    ctx = frame.page_context(request)
    report = system_service.system_report(ctx)
    since_at, until_at = parse_time(since), parse_time(until)
    bad = [
        name
        for name, raw, at in (("since", since, since_at), ("until", until, until_at))
        if raw.strip() and at is None
    ]
    flt = AuditFilter(
        actor=actor.strip(),
        action=action.strip(),
        target=target.strip(),
        since=since_at,
        until=until_at,
        limit=per,
        offset=(page - 1) * per,
    )
    entries, total = job_service.audit_entries(ctx, flt)
    params = {
        "actor": actor,
        "action": action,
        "target": target,
        "since": since,
        "until": until,
        "per": per,
    }

    return frame.render(
        request,
        "system.html",
        page="system",
        title="System",
        user=user,
        report=report,
        disks=[(d, disk_bar(d)) for d in report.disks],
        activity_chart=_activity_chart(report),
        totals=report.activity_totals,
        fmt_bytes=fmt_bytes,
        entries=entries,
        bad_times=bad,
        actions=system_service.audit_actions(ctx),
        **frame.paging(request, "web_system", params, page=page, per=per, total=total),
    )
