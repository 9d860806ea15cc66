"""The web console's page frame: :func:`render` (the Jinja2 environment and its formatters,
the security headers), :func:`login_redirect`, :func:`page_context`, the model status the
frame shows, and the paging helpers of the lists. Every page module renders through it.

Plain server-rendered HTML (Jinja2, autoescaped) with small scripts (``static/``) that
refresh lists from the JSON API and post the operator actions with the CSRF header
(double-submit cookie). Authentication is the API's (``node.api.auth``): a page
request without a valid session is redirected to ``/login``; actions are enforced by the
API's role checks whatever the page shows. Every page carries a Content-Security-Policy that
allows only the node itself, and the pages never log report text or patient data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from node.services import quality
from node.services import system as system_service
from node.services.context import ServiceContext
from node.web import auth

__all__ = [
    "CSP",
    "PAGE_SIZES",
    "SECURITY_HEADERS",
    "STATIC_DIR",
    "STATIC_TYPES",
    "ModelStatus",
    "PageNo",
    "PageUser",
    "PerPage",
    "login_redirect",
    "model_status",
    "page_context",
    "page_count",
    "page_url",
    "paging",
    "render",
]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
# self only; blob: for the generated PNG shown by the Try page (an object URL of a fetch)
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # pages hold draft report text: keep them out of shared caches and the back/forward cache
    "Cache-Control": "no-store",
}


_env = Environment(
    loader=FileSystemLoader(str(HERE / "templates")),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _fmt_num(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else f"{value:.3f}"
    return str(value)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 120:
        return f"{sign}{s:.0f} s"
    if s < 7200:
        return f"{sign}{s / 60:.0f} min"
    return f"{sign}{s / 3600:.1f} h"


def _fmt_pn(value: str | None) -> str:
    """A Person Name (PS3.5 6.2, ``Family^Given^Middle^Prefix^Suffix``, alphabetic group)
    as ``FAMILY, Given Middle``."""
    if not value:
        return ""
    parts = [p.strip() for p in value.split("=")[0].split("^")]
    family, rest = parts[0], " ".join(p for p in parts[1:4] if p)
    return f"{family}, {rest}" if family and rest else family or rest


def _fmt_da(value: str | None) -> str:
    """A DICOM date (DA, ``YYYYMMDD``) as ``YYYY-MM-DD``."""
    if not value or len(value) != 8:
        return value or ""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def _span(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


_env.globals.update(
    fmt_time=_fmt_time,
    fmt_num=_fmt_num,
    fmt_duration=_fmt_duration,
    fmt_pn=_fmt_pn,
    fmt_da=_fmt_da,
    span=_span,
)


@dataclass(frozen=True)
class ModelStatus:
    """What the console shows about the model: ``state`` is ready, loading, error or none."""

    state: str
    demo: bool = False
    name: str | None = None
    version: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of the fields."""
        return asdict(self)


def model_status(ctx: ServiceContext) -> ModelStatus:
    """What the page frame shows of this process's model
    (:func:`node.services.system.model_state`): ``none`` without a model, ``error`` when
    loading failed, ``ready`` once warmed up, ``loading`` otherwise."""
    m = system_service.model_state(ctx)
    return ModelStatus(state=m.state, demo=m.demo, name=m.name, version=m.version, error=m.error)


def render(
    request: Request,
    template: str,
    *,
    page: str,
    title: str,
    user: auth.Principal | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """Render a console page: ``template`` with the page frame's context (user, model state,
    quality alert, CSRF token, ``url``/``static_url``) and ``context``; security headers
    (CSP, no-store) on the response."""
    ctx = page_context(request)
    settings = ctx.settings

    def url(route: str, /, **params: Any) -> str:
        return str(request.app.url_path_for(route, **{k: str(v) for k, v in params.items()}))

    def static_url(filename: str) -> str:
        return url("web_static", name=filename)

    html = _env.get_template(template).render(
        page=page,
        page_title=title,
        user=user,
        ae_title=settings.ae_title,
        model=model_status(ctx),
        quality_alert=quality.alert_state(ctx) if user is not None else None,
        csrf_token=auth.csrf_token(request),
        csrf_header=auth.CSRF_HEADER,
        csrf_cookie=auth.CSRF_COOKIE,
        url=url,
        static_url=static_url,
        status_code=status_code,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def login_redirect(request: Request) -> RedirectResponse:
    """303 to the login page, which comes back to this page (path and query) after it."""
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    resp = RedirectResponse(
        str(request.app.url_path_for("web_login")) + "?next=" + _quote(target), status_code=303
    )
    for k, v in SECURITY_HEADERS.items():
        resp.headers[k] = v
    return resp


def _quote(text: str) -> str:
    return quote(text, safe="/")


PageUser = Annotated[auth.Principal | None, Depends(auth.optional_principal)]


def page_context(request: Request) -> ServiceContext:
    """The services' context of the application serving ``request``."""
    return auth.api_context(request)


PAGE_SIZES = (25, 50, 100, 200)
"""The page sizes a paged console list offers."""
PageNo = Annotated[int, Query(ge=1, le=10**6, description="1-based page number.")]
PerPage = Annotated[int, Query(ge=1, le=200, description="Rows per page.")]


def page_url(request: Request, route: str, params: dict[str, Any]) -> Callable[..., str]:
    """A function giving the URL of page ``route`` with the query ``params`` updated by its
    keyword arguments (empty values left out): the links of a paged, filtered list."""
    base = str(request.app.url_path_for(route))

    def url(**changes: Any) -> str:
        kept = {k: v for k, v in {**params, **changes}.items() if v not in ("", None)}
        return base + ("?" + urlencode(kept) if kept else "")

    return url


def page_count(total: int, per: int) -> int:
    """How many pages of ``per`` rows ``total`` rows fill (at least one)."""
    return max(1, math.ceil(total / per))


def paging(
    request: Request, route: str, params: dict[str, Any], *, page: int, per: int, total: int
) -> dict[str, Any]:
    """The render context of a paged, filtered list, which ``templates/paging.html`` reads.

    Parameters
    ----------
    request
        The page's request (its application resolves ``route``).
    route
        The name of the list's page route.
    params
        The list's query (its filters), kept in the links to the other pages.
    page
        The 1-based page shown.
    per
        Rows per page.
    total
        Rows matching the filters, on all pages.

    Returns
    -------
    dict
        ``params``, ``total``, ``page_no``, ``per``, ``page_sizes`` (:data:`PAGE_SIZES`),
        ``pages`` (:func:`page_count`) and ``page_url`` (:func:`page_url` of ``params``
        and the page shown).
    """
    return {
        "params": params,
        "total": total,
        "page_no": page,
        "per": per,
        "page_sizes": PAGE_SIZES,
        "pages": page_count(total, per),
        "page_url": page_url(request, route, {**params, "page": page}),
    }
