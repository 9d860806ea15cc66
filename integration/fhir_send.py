"""A small FHIR REST sender (httpx) for the report Bundles (FHIR R4 RESTful API).

:func:`send_transaction` POSTs a transaction Bundle to the base URL; :func:`update_conditional`
PUTs one resource with a conditional update on its identifier. Bearer token, JSON
``application/fhir+json``, timeouts; 2xx = delivered; 408, 429, 5xx, timeouts and
connection errors are transient; every other status (4xx, and 3xx: redirects are not
followed) is permanent (:class:`~integration.errors.FhirDeliveryError`). Logs and errors
carry the URL, status and OperationOutcome issue codes only, never the token or a
diagnostics text (which may quote the resource).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from integration.destinations import FhirDestination
from integration.errors import FhirBuildError, FhirDeliveryError

__all__ = ["FhirResult", "send_transaction", "update_conditional"]

# the name the sender logged under before it left integration.fhir_report (log filters)
LOGGER = logging.getLogger("integration.fhir_report")


@dataclass(frozen=True, slots=True)
class FhirResult:
    """A delivered interaction: HTTP status and the Location(s) the server reported."""

    http_status: int
    locations: tuple[str, ...] = ()


def send_transaction(
    bundle: Mapping[str, Any],
    dest: FhirDestination,
    *,
    client: httpx.Client | None = None,
) -> FhirResult:
    """POST a transaction Bundle to the server's base URL (FHIR RESTful API, transaction).

    Parameters
    ----------
    bundle
        From :func:`integration.fhir_report.build_draft_bundle` /
        :func:`integration.fhir_withdrawal.build_withdrawal_bundle`.
    dest
        The server.
    client
        An httpx client to reuse (its own timeout/verify settings apply); default a new one.

    Returns
    -------
    FhirResult
        HTTP status and each ``entry.response.location`` of a transaction-response Bundle.

    Raises
    ------
    integration.errors.FhirDeliveryError
        Not 2xx, a timeout or a connection error; ``transient`` per the module text.
    """
    return _request("POST", dest.base_url.rstrip("/"), bundle, dest, client, what="transaction")


def update_conditional(
    resource: Mapping[str, Any],
    dest: FhirDestination,
    *,
    identifier: tuple[str, str],
    client: httpx.Client | None = None,
) -> FhirResult:
    """PUT one resource with a conditional update on its identifier (FHIR RESTful API).

    Parameters
    ----------
    resource
        E.g. the DiagnosticReport entry of a withdrawal Bundle.
    dest
        The server.
    identifier
        ``(system, value)`` searched for: ``PUT [type]?identifier=system|value`` (200 when
        one match was updated, 201 when none existed and it was created, 412 when several
        match).
    client
        As in :func:`send_transaction`.

    Returns
    -------
    FhirResult
        HTTP status and the ``Location``/``Content-Location`` header.

    Raises
    ------
    integration.errors.FhirDeliveryError
        As for :func:`send_transaction`.
    """
    kind = str(resource.get("resourceType") or "")
    if not re.fullmatch(r"[A-Z][A-Za-z]+", kind):
        raise FhirBuildError("resource has no resourceType")
    query = urlencode({"identifier": f"{identifier[0]}|{identifier[1]}"})
    return _request(
        "PUT", f"{dest.base_url.rstrip('/')}/{kind}?{query}", resource, dest, client, what=kind
    )


def _request(
    method: str,
    url: str,
    body: Mapping[str, Any],
    dest: FhirDestination,
    client: httpx.Client | None,
    *,
    what: str,
) -> FhirResult:
    """Send one request and judge the reply (see the module text).

    Parameters
    ----------
    method, url
        HTTP method and absolute URL.
    body
        JSON body (the resource or Bundle).
    dest
        The server: bearer token, timeout, TLS verification; its ``str`` names it in logs.
    client
        A client to reuse, or ``None`` for one that is closed afterwards.
    what
        What is sent, for logs and errors (``"transaction"`` or the resource type).

    Returns
    -------
    FhirResult
        On 2xx.

    Raises
    ------
    integration.errors.FhirDeliveryError
        Any other status (with the OperationOutcome issue codes), a timeout or a
        connection error; the exceptions of httpx are not chained.
    """
    headers = {
        "Content-Type": "application/fhir+json; charset=utf-8",
        "Accept": "application/fhir+json",
    }
    if dest.bearer_token:
        headers["Authorization"] = f"Bearer {dest.bearer_token}"
    own = client is None
    http = client or httpx.Client(timeout=dest.timeout, verify=dest.verify)
    try:
        response = http.request(method, url, json=dict(body), headers=headers)
    except httpx.TimeoutException as exc:
        raise FhirDeliveryError(
            f"FHIR {what} to {dest} timed out after {dest.timeout} s ({type(exc).__name__})"
        ) from None
    except httpx.HTTPError as exc:
        raise FhirDeliveryError(f"FHIR {what} to {dest} failed: {type(exc).__name__}") from None
    finally:
        if own:
            http.close()
    status = response.status_code
    if 200 <= status < 300:
        locations = _locations(response)
        LOGGER.info("FHIR %s %s to %s: HTTP %d", method, what, dest, status)
        return FhirResult(http_status=status, locations=locations)
    issues = _issue_codes(response)
    error = FhirDeliveryError(
        f"FHIR {what} to {dest} failed: HTTP {status}"
        + (f" (OperationOutcome issue codes: {', '.join(issues)})" if issues else ""),
        http_status=status,
    )
    LOGGER.warning(
        "FHIR %s %s to %s: HTTP %d (%s)",
        method,
        what,
        dest,
        status,
        "transient" if error.transient else "permanent",
    )
    raise error


def _json(response: httpx.Response) -> Any:
    """The JSON body of ``response``, or ``None`` when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None


def _locations(response: httpx.Response) -> tuple[str, ...]:
    """Each ``entry.response.location`` of a Bundle reply, then the Location headers."""
    data = _json(response)
    found: list[str] = []
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        for entry in data.get("entry") or []:
            location = ((entry or {}).get("response") or {}).get("location")
            if location:
                found.append(str(location))
    for header in ("Location", "Content-Location"):
        if header in response.headers:
            found.append(response.headers[header])
    return tuple(found)


def _issue_codes(response: httpx.Response) -> list[str]:
    """``severity/code`` of up to 10 OperationOutcome issues (never the diagnostics text)."""
    data = _json(response)
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        return []
    codes = []
    for issue in data.get("issue") or []:
        if isinstance(issue, dict) and issue.get("code"):
            codes.append(f"{issue.get('severity', '?')}/{issue['code']}")
    return codes[:10]
