"""Withdrawal of a sent AI draft in FHIR R4: its DiagnosticReport marked ``entered-in-error``.

:func:`build_withdrawal_bundle` builds a ``transaction`` Bundle with only the conditional
``PUT`` of the report that :func:`integration.fhir_report.build_draft_bundle` sent (same
``urn:dicom:uid`` identifier, so the server updates the same resource), with ``status``
:data:`WITHDRAWN_STATUS` (FHIR R4 DiagnosticReport.status, value set
diagnostic-report-status), the reason in the narrative, and no conclusion or PDF. There is
no Device or Provenance entry: the server's version history keeps the draft and its
Provenance, and the withdrawal has no new author.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from integration.errors import FhirBuildError
from integration.fhir_report import (
    FhirDraft,
    ReportContext,
    check_draft,
    narrative,
    report_entry,
    report_resource,
    transaction_bundle,
    xhtml_text,
)

__all__ = ["WITHDRAWN_STATUS", "build_withdrawal_bundle"]

WITHDRAWN_STATUS = "entered-in-error"
"""DiagnosticReport.status of a withdrawn draft."""


def build_withdrawal_bundle(
    source: Dataset,
    draft: FhirDraft,
    *,
    reason: str,
    context: ReportContext = ReportContext(),
) -> dict[str, Any]:
    """Build the transaction Bundle that marks a sent draft ``entered-in-error``.

    Parameters
    ----------
    source, context
        As for :func:`integration.fhir_report.build_draft_bundle` (same values as the
        draft's, so the conditional update finds the same report).
    draft
        The draft as it was sent; ``issued`` is the time of the withdrawal.
    reason
        Why it is withdrawn (narrative; no patient data).

    Returns
    -------
    dict
        A transaction Bundle with one entry: the conditional PUT of the report with status
        ``entered-in-error``.

    Raises
    ------
    integration.errors.FhirBuildError
        As for :func:`integration.fhir_report.build_draft_bundle`, or an empty reason.
    """
    if not reason or not reason.strip():
        raise FhirBuildError("a withdrawal needs a reason")
    check_draft(source, draft)  # as for the draft (which also derives the device UID)
    div = narrative(draft, lead=[_notice(reason.strip())])
    report = report_resource(source, draft, WITHDRAWN_STATUS, div, context)
    return transaction_bundle([report_entry(report, draft)])


def _notice(reason: str) -> str:
    """The narrative's first paragraph: withdrawn, must not be used, and why (escaped)."""
    return (
        "<p><b>WITHDRAWN: this AI-generated draft is wrong and must not be used.</b> "
        + xhtml_text(f"Reason: {reason}")
        + "</p>"
    )
