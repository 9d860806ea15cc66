"""Studies completed: after their quiet period (or the longest wait) a study's routing
decides whether its job is queued or the study is skipped (:func:`complete_quiet_studies`,
run by the node's study sweep). Commits per :mod:`node.db.tx`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from integration.routing import RuleSet
from node.db.job_events import add_event
from node.db.jobs import active_job, new_job, transition
from node.db.models import JobState, Study, StudyState, utcnow
from node.db.study_facts import FactsOf, recorded_facts
from node.db.tx import in_transaction
from node.settings import ChestRule
from node.settings.routing import default_rule_set

__all__ = ["CompletionResult", "complete_quiet_studies"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletionResult:
    """A study completed by :func:`complete_quiet_studies`."""

    study_uid: str
    state: StudyState
    reason: str
    job_id: int | None
    forced: bool


def complete_quiet_studies(
    session: Session,
    *,
    quiet_seconds: float,
    max_wait_seconds: float,
    now: datetime | None = None,
    rule: ChestRule,
    limit: int = 200,
    job_max_attempts: int = 3,
    rules: RuleSet | None = None,
    facts_of: FactsOf | None = None,
) -> list[CompletionResult]:
    """Complete studies quiet for ``quiet_seconds`` (or receiving for ``max_wait_seconds``).

    A completed study that passes the chest rule gets exactly one ``queued`` job (its
    ``received`` job is queued); otherwise it is ``skipped`` with the reason and its
    ``received`` job is cancelled. Idempotent and race-free: a study is completed only from
    ``receiving``, under a row lock (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite
    ``BEGIN IMMEDIATE``), so concurrent sweeps never queue two jobs. Commits.

    The routing ``rules`` decide (:mod:`integration.routing`; default: the chest ``rule``
    alone) on the facts ``facts_of`` gives (default: what the database records,
    :func:`node.db.study_facts.recorded_facts`; the node passes
    :func:`node.runtime.routing.facts_reader`, which also reads spooled headers when a rule
    needs attributes the database does not record).
    """
    now = now or utcnow()
    rule_set = rules if rules is not None else default_rule_set(rule)
    quiet_cutoff = now - timedelta(seconds=quiet_seconds)
    forced_cutoff = now - timedelta(seconds=max_wait_seconds)

    def work() -> list[CompletionResult]:
        studies = session.scalars(
            select(Study)
            .where(
                Study.state == StudyState.receiving,
                or_(Study.last_received_at <= quiet_cutoff, Study.receiving_since <= forced_cutoff),
            )
            .order_by(Study.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        ).all()
        return [
            _complete_study(
                session,
                study,
                now=now,
                forced=study.last_received_at > quiet_cutoff,
                rules=rule_set,
                facts_of=facts_of or recorded_facts,
                job_max_attempts=job_max_attempts,
            )
            for study in studies
        ]

    return in_transaction(session, work)


def _complete_study(
    session: Session,
    study: Study,
    *,
    now: datetime,
    forced: bool,
    rules: RuleSet,
    facts_of: FactsOf,
    job_max_attempts: int,
) -> CompletionResult:
    """Complete one locked ``receiving`` study: queue its job, or skip it with the reason.

    The routing rules (:meth:`integration.routing.RuleSet.evaluate`; by default the chest
    rule) look at the study's description and calling AE, its series' Modality, Body Part
    Examined and Series Description (PS3.3 C.7.3.1) and, when a rule needs them, header
    attributes of each series' first instance. A queued job gets the matching rule's name,
    model and destinations, and the higher of its priority and the rule's.
    """
    facts = facts_of(session, study)
    decision = rules.evaluate(facts)
    study.completed_at = now
    study.forced_completion = forced
    job = active_job(session, study.id)
    job_id: int | None = None
    if decision.draft:
        study.state = StudyState.complete
        study.skip_reason = None
        if job is None:
            job = new_job(study.id, now, max_attempts=job_max_attempts)
            session.add(job)
            session.flush()
            add_event(session, job.id, "received", actor=study.calling_ae, now=now)
        if job.state is JobState.received:
            transition(job, JobState.queued, now=now, detail={"rule": decision.rule})
        job.rule = decision.rule
        job.model = decision.model
        job.destinations = None if decision.destinations is None else list(decision.destinations)
        if decision.priority is not None:
            job.priority = max(job.priority, decision.priority)
        job_id = job.id
    else:
        study.state = StudyState.skipped
        study.skip_reason = decision.reason
        if job is not None:
            transition(job, JobState.cancelled, now=now)
            job.last_error = f"study skipped: {decision.reason}"
            job.rule = decision.rule
            job_id = job.id
    log.info(
        "study %s %s%s: %s (job %s)",
        study.study_instance_uid,
        study.state.value,
        " (forced: max wait reached)" if forced else "",
        decision.reason,
        job_id,
    )
    return CompletionResult(study.study_instance_uid, study.state, decision.reason, job_id, forced)
