"""Errors of the services, by kind; each front end maps the kind to its own answer.

The API maps them to HTTP statuses by type (:data:`node.api.errors.STATUS_BY_TYPE`), the
CLI to exit status 1. Messages name UIDs and limits, never patient data.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "Forbidden",
    "Gone",
    "InputTooLarge",
    "InvalidInput",
    "NotConfigured",
    "NotFound",
    "ServiceError",
    "Unavailable",
]


class ServiceError(Exception):
    """Base of the services' errors; ``str(exc)`` is the reason given to the user."""


class NotFound(ServiceError, LookupError):
    """What was asked for does not exist (HTTP 404)."""


class Forbidden(ServiceError, PermissionError):
    """The caller's role does not allow this form of the request (HTTP 403)."""


class Gone(ServiceError, LookupError):
    """It existed but is no longer stored, e.g. an instance purged from the spool (410)."""


class Conflict(ServiceError):
    """The target's kind or state does not allow the request, e.g. C-ECHO to STOW-RS (409)."""


class InvalidInput(ServiceError, ValueError):
    """The input cannot be used: not DICOM or PNG, no pixel data, no instances (422)."""


class NotConfigured(InvalidInput):
    """The request names something the configuration does not have (422)."""


class InputTooLarge(ServiceError, ValueError):
    """The input is larger than the configured limit (413)."""


class Unavailable(ServiceError, RuntimeError):
    """What the request needs does not run in this process, e.g. no model host (503)."""
