"""The console's Receive log page: every association offered to the storage SCP, newest
first, with its calling AE, address, TLS, start and end, outcome (PS3.8 7.1-7.4; a
rejection, PS3.8 9.3.4, with its reason) and its C-STORE answers by status (PS3.4 Table
B.2-1), each refused instance with its status and reason.

Filters: calling AE, study (``/receive-log?study=<Study Instance UID>``: the associations
that delivered instances of the study or had refusals for it; the job page links there),
outcome and a date range (UTC); paged on the server. The study is matched as the log stores
it, as ``GET /api/receive-log?study_uid=`` does: an instance refused for an invalid Study
Instance UID (0xA901) links to its study's view too. Viewer role and above; the same
figures as ``GET /api/receive-log``. No patient data is shown or logged.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from node.db.receive_log import OUTCOMES, ReceiveLogFilter
from node.services import receive_log as receive_service
from node.web import frame

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


def _day(value: str) -> datetime | None:
    """An ``<input type=date>`` value (``YYYY-MM-DD``) as midnight UTC, else ``None``."""
    try:
        return datetime.strptime(value.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None


@router.get("/receive-log", name="web_receive_log", response_class=HTMLResponse)
def receive_log_page(
    request: Request,
    user: frame.PageUser,
    calling_ae: Annotated[str, Query(max_length=16)] = "",
    study: Annotated[str, Query(max_length=64)] = "",
    outcome: Annotated[str, Query(pattern="^(|" + "|".join(OUTCOMES) + ")$")] = "",
    date_from: Annotated[str, Query(max_length=10)] = "",
    date_to: Annotated[str, Query(max_length=10)] = "",
    page: frame.PageNo = 1,
    per: frame.PerPage = 50,
) -> Response:
    """The receive log, filtered and paged; ``study`` gives one study's associations."""
    if user is None:
        return frame.login_redirect(request)
    ctx = frame.page_context(request)
    since = _day(date_from)
    to_day = _day(date_to)
    # the whole day; the last day a date holds (9999-12-31) has no day after it: no bound
    until = to_day + timedelta(days=1) if to_day is not None and to_day.date() < date.max else None
    flt = ReceiveLogFilter(
        calling_ae=calling_ae.strip() or None,
        study_uid=study.strip() or None,
        outcome=outcome or None,
        since=since,
        until=until,
        limit=per,
        offset=(page - 1) * per,
    )
    rows, total = receive_service.list_associations(ctx, flt)
    refused = receive_service.refused_on_page(ctx, [r.id for r in rows])
    params = {
        "calling_ae": calling_ae.strip(),
        "study": study.strip(),
        "outcome": outcome,
        "date_from": date_from if since is not None else "",
        "date_to": date_to if to_day is not None else "",
        "per": per,
    }

    return frame.render(
        request,
        "receive_log.html",
        page="receive-log",
        title="Receive log",
        user=user,
        rows=rows,
        refused=refused,
        outcomes=list(OUTCOMES),
        **frame.paging(request, "web_receive_log", params, page=page, per=per, total=total),
    )
