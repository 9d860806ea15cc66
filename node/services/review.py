"""A radiologist reviews a draft at the node: accept it, edit it, or reject it.

Only the ``reviewer`` role may review (not operators or admins: a review is a clinical
act). Accept and edit record the reviewed text as the job's final report (source
``review``) and score the draft against it like any final report; reject records the
decision and its reason (required, no patient data) and is not scored. Each review is a
new row (the latest counts), audited ``draft.review``; nothing is sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from node.db import finals as finals_db
from node.db.models import FinalSource, utcnow
from node.services.context import ServiceContext
from node.services.errors import Conflict, InvalidInput

__all__ = ["Decision", "ReviewResult", "review", "reviewable"]

MAX_TEXT = 20_000


class Decision(StrEnum):
    """What the reviewer decided about the draft."""

    accept = "accept"
    edit = "edit"
    reject = "reject"


@dataclass(frozen=True)
class ReviewResult:
    """The stored review: its final-report row and, for accept/edit, the agreement."""

    final_id: int
    decision: Decision
    agreement: float | None
    significant: bool


def review(
    ctx: ServiceContext,
    job_id: int,
    decision: Decision,
    *,
    actor: str,
    text: str | None = None,
    reason: str | None = None,
) -> ReviewResult:
    """Record a review of job ``job_id``'s draft.

    Raises
    ------
    node.services.errors.InvalidInput
        ``edit`` without text (or over :data:`MAX_TEXT` characters), ``reject`` without a
        reason, a text or reason with a NUL character (no report text; a PostgreSQL text
        value cannot hold one).
    node.services.errors.Conflict
        When the job has no report draft to review (not done, or withdrawn).
    node.db.jobs.JobNotFound
        When no job has that id.
    """
    from node.runtime.finals import FinalIntake

    for name, value in (("text", text), ("reason", reason)):
        if value is not None and "\x00" in value:
            raise InvalidInput(f"the review's {name} contains a NUL character")
    with ctx.read_sessions() as session:
        match = finals_db.draft_of_job(session, job_id)
    if match is None:
        raise Conflict(f"job {job_id} has no current report draft to review")
    final_text = _text(decision, match.text, text, reason)
    now = utcnow()
    final = finals_db.FinalIn(
        source=FinalSource.review,
        object_uid=f"review:{job_id}:{now.isoformat()}",
        sender=actor[:128],
        study_uid=match.study_uid,
        accession_number=None,
        verified=decision is not Decision.reject,
        full_text=final_text,
        findings=None,
        impression=None,
        signed_at=now,
        review_decision=decision.value,
        review_reason=reason.strip()[:256] if reason else None,
        job_id=job_id,
    )
    with ctx.write_sessions() as session:
        final_id = finals_db.record_review(session, final, actor=actor)
    if decision is Decision.reject:
        return ReviewResult(final_id, decision, None, False)
    outcome = FinalIntake(ctx.settings, ctx.write_sessions).score(final_id, final, match)
    return ReviewResult(final_id, decision, outcome.agreement, outcome.significant)


def reviewable(ctx: ServiceContext, job_id: int) -> bool:
    """Whether :func:`review` takes a review of job ``job_id``'s draft: the job is done, not
    withdrawn, and its report draft is the study's current one (no later job superseded
    it). The console offers the review form on this, so it never offers a review that
    would be refused.

    Raises
    ------
    node.db.jobs.JobNotFound
        When no job has that id.
    """
    with ctx.read_sessions() as session:
        return finals_db.draft_of_job(session, job_id) is not None


def _text(decision: Decision, draft: str, text: str | None, reason: str | None) -> str:
    if decision is Decision.reject:
        if not reason or not reason.strip():
            raise InvalidInput("a rejection needs a reason")
        return ""
    if decision is Decision.accept:
        return draft
    if not text or not text.strip():
        raise InvalidInput("an edit needs the edited report text")
    if len(text) > MAX_TEXT:
        raise InvalidInput(f"the edited text is longer than {MAX_TEXT} characters")
    return text.strip()
