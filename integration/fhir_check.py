"""Validation of the report Bundles: fhir.resources models plus the FHIR R4 rules they skip.

Models: ``fhir.resources`` 8 has no R4 package any more; its ``R4B`` models (FHIR 4.3.0) are
used. R4B's changes are "limited to particular areas of the specification" (R4B version
history: medicinal product definition, evidence and subscription resources, two new data
types); DiagnosticReport, Device, Provenance and Bundle keep the R4 elements used here, so
the JSON produced is R4 JSON and an R4 server accepts it.

Value sets and reference types fhir.resources does not enforce (it accepts any status code
and a Device performer) are checked by :func:`check_bundle`: report status (R4's 10 codes),
Bundle type and request methods, Device name types, and the target types of subject,
basedOn, imagingStudy, performer, resultsInterpreter and Provenance.agent.who.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from integration.errors import FhirBuildError

__all__ = ["R4_REPORT_STATUSES", "check_bundle"]

R4_REPORT_STATUSES = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
"""DiagnosticReport.status, required binding to R4 value set diagnostic-report-status."""
_BUNDLE_TYPES = frozenset(
    {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    }
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})
_DEVICE_NAME_TYPES = frozenset(
    {
        "udi-label-name",
        "user-friendly-name",
        "patient-reported-name",
        "manufacturer-name",
        "model-name",
        "other",
    }
)
_INTERPRETERS = frozenset({"Practitioner", "PractitionerRole", "Organization", "CareTeam"})
# Allowed reference targets of R4 DiagnosticReport elements
_REPORT_TARGETS: dict[str, frozenset[str]] = {
    "subject": frozenset({"Patient", "Group", "Device", "Location"}),
    "basedOn": frozenset(
        {
            "CarePlan",
            "ImmunizationRecommendation",
            "MedicationRequest",
            "NutritionOrder",
            "ServiceRequest",
        }
    ),
    "imagingStudy": frozenset({"ImagingStudy"}),
    "performer": _INTERPRETERS,
    "resultsInterpreter": _INTERPRETERS,
}
_AGENT_WHO = frozenset(
    {"Practitioner", "PractitionerRole", "RelatedPerson", "Patient", "Device", "Organization"}
)


def check_bundle(bundle: Mapping[str, Any]) -> Bundle:
    """Validate a Bundle with fhir.resources (R4B) and the rules it does not enforce.

    Parameters
    ----------
    bundle
        Bundle JSON data.

    Returns
    -------
    fhir.resources.R4B.bundle.Bundle
        The parsed model.

    Raises
    ------
    integration.errors.FhirBuildError
        Structure errors (pydantic: the message names the element paths, not values), a
        status outside R4's DiagnosticReport statuses, an unknown Bundle type, request
        method or Device name type, or a reference to a resource type the element does not
        allow (resolving ``urn:uuid`` references inside the Bundle).
    """
    try:
        model = Bundle.model_validate(dict(bundle))
    except ValidationError as exc:
        paths = sorted({".".join(str(p) for p in err["loc"]) for err in exc.errors()})
        raise FhirBuildError(f"Bundle does not validate at: {', '.join(paths)[:500]}") from None
    if bundle.get("type") not in _BUNDLE_TYPES:
        raise FhirBuildError(f"Bundle.type {bundle.get('type')!r} is not a Bundle type")
    entries = list(bundle.get("entry") or [])
    types_by_url = {
        str(e.get("fullUrl")): str((e.get("resource") or {}).get("resourceType"))
        for e in entries
        if e.get("fullUrl")
    }
    for index, entry in enumerate(entries):
        request = entry.get("request")
        if bundle.get("type") in ("transaction", "batch") and (
            not request or request.get("method") not in _METHODS
        ):
            raise FhirBuildError(f"Bundle.entry[{index}].request.method is missing or invalid")
        _check_resource(entry.get("resource") or {}, types_by_url)
    return model


def _check_resource(resource: Mapping[str, Any], types_by_url: dict[str, str]) -> None:
    """Check the codes and reference targets of one entry's resource (R4 resource pages).

    Raises
    ------
    integration.errors.FhirBuildError
        A DiagnosticReport.status outside :data:`R4_REPORT_STATUSES`, a reference whose
        target type the element does not allow, or an unknown Device.deviceName.type.
    """
    kind = resource.get("resourceType")
    if kind == "DiagnosticReport":
        status = resource.get("status")
        if status not in R4_REPORT_STATUSES:
            raise FhirBuildError(f"DiagnosticReport.status {status!r} is not an R4 code")
        for element, allowed in _REPORT_TARGETS.items():
            for ref in _references(resource.get(element)):
                _check_target(ref, allowed, f"DiagnosticReport.{element}", types_by_url)
    elif kind == "Provenance":
        for agent in resource.get("agent") or []:
            _check_target(agent.get("who") or {}, _AGENT_WHO, "Provenance.agent.who", types_by_url)
    elif kind == "Device":
        for name in resource.get("deviceName") or []:
            if name.get("type") not in _DEVICE_NAME_TYPES:
                raise FhirBuildError(f"Device.deviceName.type {name.get('type')!r} is invalid")


def _references(value: Any) -> Iterator[Mapping[str, Any]]:
    """The Reference objects of an element (one, a list of them, or none)."""
    if isinstance(value, Mapping):
        yield value
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping):
                yield item


def _check_target(
    ref: Mapping[str, Any], allowed: frozenset[str], where: str, types_by_url: dict[str, str]
) -> None:
    """Check the resource types a Reference points to (``type``, a Bundle fullUrl, a path).

    Raises
    ------
    integration.errors.FhirBuildError
        No type can be told, or one of them is not in ``allowed``.
    """
    reference = str(ref.get("reference") or "")
    kinds = set()
    if ref.get("type"):
        kinds.add(str(ref["type"]))
    if reference in types_by_url:
        kinds.add(types_by_url[reference])
    elif re.match(r"^[A-Z][A-Za-z]+/", reference):
        kinds.add(reference.split("/", 1)[0])
    if not kinds:
        raise FhirBuildError(f"{where}: reference without a resolvable type")
    if not kinds <= allowed:
        raise FhirBuildError(
            f"{where} may refer to {', '.join(sorted(allowed))}, not {', '.join(sorted(kinds))}"
        )
