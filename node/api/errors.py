"""The one place that maps errors to HTTP statuses, each answer with a reason.

Order of precedence, by the exception's type: the types of :data:`STATUS_BY_TYPE` (the
repository's errors and those of :mod:`node.services.errors`; a DICOM, HL7 or FHIR peer
that refused or failed is a 502 whatever status the peer answered; data that is not DICOM
is a 422; a value the database refuses to hold, such as a NUL character in a text on
PostgreSQL, is a 422 whose reason names no SQL), then an explicit ``http_status``
attribute (models' and integration errors carry one, as do :class:`ApiError` and the model
host's ``ModelNotReady``), then ``ValueError`` (a value refused by a constructor: 422).
Anything else is a 500 whose body names no internals; it is logged with its traceback (no
patient data: messages in this code base never carry any).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from integration.errors import DeliveryError, IntegrationError
from node.db.jobs import JobConflict, JobNotFound, LeaseLost
from node.services import errors as service_errors

__all__ = [
    "REASON_BY_TYPE",
    "STATUS_BY_TYPE",
    "ApiError",
    "error_body",
    "install_error_handlers",
    "reason_for",
    "status_for",
]

log = logging.getLogger(__name__)

STATUS_BY_TYPE: dict[type[BaseException], int] = {
    JobConflict: 409,
    JobNotFound: 404,
    LeaseLost: 409,
    DeliveryError: 502,
    InvalidDicomError: 422,
    service_errors.NotFound: 404,
    service_errors.Gone: 410,
    service_errors.Forbidden: 403,
    service_errors.Conflict: 409,
    service_errors.InvalidInput: 422,
    service_errors.InputTooLarge: 413,
    service_errors.Unavailable: 503,
    DataError: 422,
}
#: the reason given for errors whose own text names internals (the SQL statement)
REASON_BY_TYPE: dict[type[BaseException], str] = {
    DataError: "a value the database cannot hold (e.g. a NUL character in a text)",
}


class ApiError(Exception):
    """An error raised by the API's own code, with its HTTP status.

    Parameters
    ----------
    http_status
        The status to answer (4xx or 5xx).
    message
        The reason given to the client (no patient data).
    headers
        Extra response headers (e.g. ``WWW-Authenticate`` on 401).
    """

    def __init__(
        self, http_status: int, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        if not 400 <= http_status <= 599:
            raise ValueError(f"http_status must be an error status, got {http_status}")
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.headers = headers or {}


def status_for(exc: BaseException) -> int | None:
    """The HTTP status ``exc`` maps to, or ``None`` for an unexpected error (500)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_TYPE:
            return STATUS_BY_TYPE[cls]
    status = getattr(exc, "http_status", None)
    if isinstance(status, int) and 400 <= status <= 599:
        return status
    if isinstance(exc, ValueError):
        return 422
    return None


def error_body(status: int, reason: str, error: str) -> dict[str, Any]:
    """The JSON body of every error answer: ``{"detail", "error", "status"}``."""
    return {"detail": reason, "error": error, "status": status}


def reason_for(exc: BaseException) -> str:
    """The reason an error answer gives for ``exc``: its ``message`` or text, or the fixed
    reason of :data:`REASON_BY_TYPE` for its type."""
    for cls in type(exc).__mro__:
        if cls in REASON_BY_TYPE:
            return REASON_BY_TYPE[cls]
    message = getattr(exc, "message", None)
    return str(message if isinstance(message, str) and message else exc) or type(exc).__name__


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    status = status_for(exc)
    headers = dict(getattr(exc, "headers", None) or {})
    if status is None:
        log.error(
            "%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
        )
        return JSONResponse(
            error_body(500, "internal error (see the node's log)", "InternalError"), status_code=500
        )
    if status >= 500 or isinstance(exc, DataError):  # a refused value may be the node's bug
        log.warning("%s %s: %s %s", request.method, request.url.path, status, reason_for(exc))
    return JSONResponse(
        error_body(status, reason_for(exc), type(exc).__name__), status_code=status, headers=headers
    )


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB" if n >= 1024 * 1024 else f"{n / 1024:g} KiB"


async def _handle_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 413:
        # FastAPI's body limit (max_body_size): name the limit, and close the connection
        # rather than drain the rest of a body nobody will read (RFC 9110 §15.5.14)
        limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
        if isinstance(limit, int):
            detail = f"request body larger than {_size(limit)}, the limit of this route"
        headers["Connection"] = "close"
    return JSONResponse(
        error_body(exc.status_code, detail, "HTTPException"),
        status_code=exc.status_code,
        headers=headers,
    )


# Handled by Starlette's ExceptionMiddleware (looked up along the exception's MRO); a
# handler for bare ``Exception`` would run in the outer error middleware, which re-raises.
_HANDLED: tuple[type[Exception], ...] = (
    ApiError,
    service_errors.ServiceError,
    IntegrationError,
    LookupError,
    ValueError,
    RuntimeError,
    OSError,
    TypeError,
    DataError,
)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (request validation stays FastAPI's 422).

    Unexpected errors of other kinds become the generic 500 answer of :func:`_handle`.
    """
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    for cls in _HANDLED:
        app.add_exception_handler(cls, _handle)
    app.add_exception_handler(Exception, _handle)
