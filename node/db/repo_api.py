"""Queries of the admin API: tokens, web sessions, job filters and detail, audit listing.

Like :mod:`node.db.repository`, functions that change state run one transaction, write their
audit row in it, and commit before returning. Token and session secrets never reach this
module: callers pass their SHA-256 (see :mod:`node.api.auth`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.db.models import (
    ApiRole,
    ApiSession,
    ApiToken,
    AuditLog,
    Delivery,
    DeliveryState,
    Draft,
    Instance,
    Job,
    JobState,
    Study,
    utcnow,
)
from node.db.repository import JobNotFound, _audit, _in_transaction

__all__ = [
    "AuditEntry",
    "DeliveryRow",
    "DraftRow",
    "JobDetail",
    "JobFilter",
    "JobRow",
    "SrVersion",
    "StudyNotFound",
    "TokenNotFound",
    "TokenRow",
    "active_session",
    "audit_entries",
    "create_session",
    "create_token",
    "end_session",
    "filter_jobs",
    "job_detail",
    "list_tokens",
    "metric_counts",
    "revoke_token",
    "set_priority",
    "sr_chain",
    "study_instances",
    "token_by_hash",
    "touch_token",
]


class TokenNotFound(LookupError):
    """No API token with that id (HTTP 404)."""

    http_status = 404


class StudyNotFound(LookupError):
    """No study with that Study Instance UID (0020,000D) on this node (HTTP 404)."""

    http_status = 404


# --- tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRow:
    """An API token as listed (never its secret or hash)."""

    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, t: ApiToken) -> TokenRow:
        """Build from the ORM row."""
        return cls(t.id, t.name, t.role.value, t.created_at, t.revoked_at, t.last_used_at)


def create_token(
    session: Session, *, name: str, role: ApiRole | str, token_hash: str, actor: str
) -> TokenRow:
    """Store a new token (its SHA-256 only) and audit ``token.create``. Commits."""
    role = ApiRole(role)
    if len(token_hash) != 64:
        raise ValueError("token_hash must be a SHA-256 hex digest")
    name = name.strip()[:128]
    if not name:
        raise ValueError("token name must not be empty")

    def work() -> TokenRow:
        now = utcnow()
        tok = ApiToken(name=name, role=role, token_hash=token_hash, created_at=now)
        session.add(tok)
        session.flush()
        _audit(
            session,
            actor=actor,
            action="token.create",
            target=f"token:{tok.id}",
            detail={"name": name, "role": role.value},
            now=now,
        )
        return TokenRow.of(tok)

    return _in_transaction(session, work)


def revoke_token(session: Session, token_id: int, *, actor: str) -> TokenRow:
    """Revoke a token and end its web sessions (idempotent); audit ``token.revoke``. Commits.

    Raises
    ------
    TokenNotFound
        When no token has that id.
    """

    def work() -> TokenRow:
        tok = session.scalars(
            select(ApiToken).where(ApiToken.id == token_id).with_for_update()
        ).first()
        if tok is None:
            raise TokenNotFound(f"API token {token_id} does not exist")
        now = utcnow()
        already = tok.revoked_at is not None
        if not already:
            tok.revoked_at = now
        session.execute(
            update(ApiSession)
            .where(ApiSession.token_id == token_id, ApiSession.ended_at.is_(None))
            .values(ended_at=now)
        )
        _audit(
            session,
            actor=actor,
            action="token.revoke",
            target=f"token:{token_id}",
            detail={"name": tok.name, "already_revoked": already},
            now=now,
        )
        return TokenRow.of(tok)

    return _in_transaction(session, work)


def list_tokens(session: Session) -> list[TokenRow]:
    """Every token, oldest first."""
    return [TokenRow.of(t) for t in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def token_by_hash(session: Session, token_hash: str) -> TokenRow | None:
    """The active (not revoked) token with this SHA-256, or ``None``."""
    tok = session.scalars(
        select(ApiToken).where(ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None))
    ).first()
    return TokenRow.of(tok) if tok is not None else None


def touch_token(
    session: Session, token_id: int, *, now: datetime | None = None, every_seconds: float = 60.0
) -> bool:
    """Set ``last_used_at`` unless it was set less than ``every_seconds`` ago. Commits.

    The throttle keeps read requests from taking the (SQLite) write lock on every call.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=every_seconds)

    def work() -> bool:
        res = session.execute(
            update(ApiToken)
            .where(
                ApiToken.id == token_id,
                (ApiToken.last_used_at.is_(None)) | (ApiToken.last_used_at < cutoff),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(res, "rowcount", 0))

    return _in_transaction(session, work)


# --- web sessions ---------------------------------------------------------------------------


def create_session(
    session: Session,
    *,
    token_id: int,
    session_hash: str,
    csrf_hash: str,
    lifetime: timedelta,
    actor: str,
) -> datetime:
    """Open a web-console session for a token; audit ``session.create``. Returns its expiry."""

    def work() -> datetime:
        now = utcnow()
        expires = now + lifetime
        session.add(
            ApiSession(
                token_id=token_id,
                session_hash=session_hash,
                csrf_hash=csrf_hash,
                created_at=now,
                expires_at=expires,
            )
        )
        _audit(session, actor=actor, action="session.create", target=f"token:{token_id}", now=now)
        return expires

    return _in_transaction(session, work)


def active_session(
    session: Session, session_hash: str, *, now: datetime | None = None
) -> tuple[TokenRow, str] | None:
    """The token and CSRF hash of a live session (not ended, not expired, token not revoked)."""
    now = now or utcnow()
    row = session.execute(
        select(ApiToken, ApiSession.csrf_hash)
        .join(ApiSession, ApiSession.token_id == ApiToken.id)
        .where(
            ApiSession.session_hash == session_hash,
            ApiSession.ended_at.is_(None),
            ApiSession.expires_at > now,
            ApiToken.revoked_at.is_(None),
        )
    ).first()
    if row is None:
        return None
    return TokenRow.of(row[0]), str(row[1])


def end_session(session: Session, session_hash: str, *, actor: str) -> bool:
    """End a web session (log out); audit ``session.end``. Commits; ``False`` if none."""

    def work() -> bool:
        s = session.scalars(
            select(ApiSession).where(
                ApiSession.session_hash == session_hash, ApiSession.ended_at.is_(None)
            )
        ).first()
        if s is None:
            return False
        s.ended_at = utcnow()
        _audit(session, actor=actor, action="session.end", target=f"token:{s.token_id}")
        return True

    return _in_transaction(session, work)


# --- jobs -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobFilter:
    """Filters of the job list; every given criterion must hold (AND).

    ``since``/``until`` bound ``created_at`` (``since`` inclusive, ``until`` exclusive);
    ``destination`` matches jobs with a delivery to that destination (its text form).
    """

    states: Sequence[JobState] = ()
    since: datetime | None = None
    until: datetime | None = None
    study_uid: str | None = None
    destination: str | None = None
    limit: int = 100
    offset: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= 1000:
            raise ValueError(f"limit must be within 1..1000, got {self.limit}")
        if self.offset < 0:
            raise ValueError(f"offset must not be negative, got {self.offset}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")


@dataclass(frozen=True)
class JobRow:
    """A job in a list."""

    id: int
    study_uid: str
    state: str
    priority: int
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    sr_uid: str | None
    lease_owner: str | None
    last_error: str | None
    withdrawn_at: datetime | None = None
    withdrawn_by: str | None = None
    withdrawn_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (datetimes as ISO 8601); ``cxr-node jobs list --json``."""
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}


def _row(job: Job, uid: str) -> JobRow:
    return JobRow(
        id=job.id,
        study_uid=uid,
        state=job.state.value,
        priority=job.priority,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        created_at=job.created_at,
        updated_at=job.updated_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        sr_uid=job.sr_sop_instance_uid,
        lease_owner=job.lease_owner,
        last_error=job.last_error,
        withdrawn_at=job.withdrawn_at,
        withdrawn_by=job.withdrawn_by,
        withdrawn_reason=job.withdrawn_reason,
    )


def filter_jobs(session: Session, flt: JobFilter) -> tuple[list[JobRow], int]:
    """Jobs matching ``flt``, newest first, and the total number of matches."""
    conds: list[Any] = []
    if flt.states:
        conds.append(Job.state.in_([JobState(s) for s in flt.states]))
    if flt.since is not None:
        conds.append(Job.created_at >= flt.since)
    if flt.until is not None:
        conds.append(Job.created_at < flt.until)
    if flt.study_uid:
        conds.append(Study.study_instance_uid == flt.study_uid)
    if flt.destination:
        conds.append(
            Job.id.in_(select(Delivery.job_id).where(Delivery.destination == flt.destination))
        )
    base = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    count_stmt = select(func.count(Job.id)).join(Study, Study.id == Job.study_id)
    if conds:
        base = base.where(*conds)
        count_stmt = count_stmt.where(*conds)
    total = int(session.scalar(count_stmt) or 0)
    rows = session.execute(base.order_by(Job.id.desc()).limit(flt.limit).offset(flt.offset))
    return [_row(job, uid) for job, uid in rows.all()], total


@dataclass(frozen=True)
class DraftRow:
    """A draft of a job (report text included: API only, never logged)."""

    id: int
    task: str
    text: str
    findings: str | None
    impression: str | None
    model_name: str
    model_version: str
    demo: bool
    timings: dict[str, Any] | None
    generation_settings: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class DeliveryRow:
    """Delivery of one of a job's objects to one destination."""

    id: int
    destination: str
    kind: str
    object: str
    object_uid: str | None
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    sent_at: datetime | None
    last_error: str | None
    created_at: datetime


@dataclass(frozen=True)
class AuditEntry:
    """An audit-log row."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    detail: dict[str, Any] | None


@dataclass(frozen=True)
class JobDetail:
    """A job with its study, drafts (newest first), deliveries, audit trail and the study's
    chain of draft SRs (oldest first)."""

    job: JobRow
    selected_sop_instance_uid: str | None
    lease_expires_at: datetime | None
    drafts: list[DraftRow] = field(default_factory=list)
    deliveries: list[DeliveryRow] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    sr_chain: list[SrVersion] = field(default_factory=list)


@dataclass(frozen=True)
class SrVersion:
    """One draft SR of a study: each later one supersedes the earlier ones (its Predecessor
    Documents Sequence, PS3.3 C.17.2, names them)."""

    job_id: int
    sr_uid: str
    finished_at: datetime | None
    withdrawn_at: datetime | None
    superseded: bool


def sr_chain(session: Session, study_uid: str) -> list[SrVersion]:
    """The study's draft SRs from this node, oldest first; all but the newest superseded."""
    rows = list(
        session.execute(
            select(Job.id, Job.sr_sop_instance_uid, Job.finished_at, Job.withdrawn_at)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_instance_uid == study_uid, Job.sr_sop_instance_uid.is_not(None))
            .order_by(Job.id)
        )
    )
    last = len(rows) - 1
    return [
        SrVersion(int(job_id), str(uid), finished, withdrawn, k < last)
        for k, (job_id, uid, finished, withdrawn) in enumerate(rows)
    ]


def _audit_row(a: AuditLog) -> AuditEntry:
    return AuditEntry(a.id, a.at, a.actor, a.action, a.target, a.detail)


def job_detail(session: Session, job_id: int) -> JobDetail:
    """Everything known about one job.

    Raises
    ------
    JobNotFound
        When no job has that id.
    """
    found = session.execute(
        select(Job, Study.study_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Job.id == job_id)
    ).first()
    if found is None:
        raise JobNotFound(f"job {job_id} does not exist")
    job, uid = found
    drafts = [
        DraftRow(
            d.id,
            d.task,
            d.full_text,
            d.findings,
            d.impression,
            d.model_name,
            d.model_version,
            d.demo,
            d.timings,
            d.generation_settings,
            d.created_at,
        )
        for d in session.scalars(
            select(Draft).where(Draft.job_id == job_id).order_by(Draft.id.desc())
        )
    ]
    deliveries = [
        DeliveryRow(
            d.id,
            d.destination,
            d.kind.value,
            d.object.value,
            d.object_uid,
            d.state.value,
            d.attempts,
            d.next_attempt_at,
            d.last_attempt_at,
            d.sent_at,
            d.last_error,
            d.created_at,
        )
        for d in session.scalars(
            select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)
        )
    ]
    audit = [
        _audit_row(a)
        for a in session.scalars(
            select(AuditLog).where(AuditLog.target == f"job:{job_id}").order_by(AuditLog.id)
        )
    ]
    return JobDetail(
        job=_row(job, uid),
        selected_sop_instance_uid=job.selected_sop_instance_uid,
        lease_expires_at=job.lease_expires_at,
        drafts=drafts,
        deliveries=deliveries,
        audit=audit,
        sr_chain=sr_chain(session, uid),
    )


def set_priority(session: Session, job_id: int, priority: int, *, actor: str) -> JobRow:
    """Change a job's priority (higher is claimed first); audit ``job.priority``. Commits.

    Raises
    ------
    JobNotFound
        When no job has that id.
    """

    def work() -> JobRow:
        found = session.execute(
            select(Job, Study.study_instance_uid)
            .join(Study, Study.id == Job.study_id)
            .where(Job.id == job_id)
            .with_for_update(of=Job)
            .execution_options(populate_existing=True)
        ).first()
        if found is None:
            raise JobNotFound(f"job {job_id} does not exist")
        job, uid = found
        before = job.priority
        job.priority = priority
        job.updated_at = utcnow()
        _audit(
            session,
            actor=actor,
            action="job.priority",
            target=f"job:{job_id}",
            detail={"from": before, "to": priority},
        )
        return _row(job, uid)

    return _in_transaction(session, work)


# --- audit ----------------------------------------------------------------------------------


def audit_entries(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[AuditEntry], int]:
    """Audit rows, newest first, with the total number of matches."""
    conds: list[Any] = []
    if actor:
        conds.append(AuditLog.actor == actor)
    if action:
        conds.append(AuditLog.action == action)
    if target:
        conds.append(AuditLog.target == target)
    if since is not None:
        conds.append(AuditLog.at >= since)
    stmt = select(AuditLog).order_by(AuditLog.id.desc()).limit(limit).offset(offset)
    count_stmt = select(func.count(AuditLog.id))
    if conds:
        stmt = stmt.where(*conds)
        count_stmt = count_stmt.where(*conds)
    total = int(session.scalar(count_stmt) or 0)
    return [_audit_row(a) for a in session.scalars(stmt)], total


# --- studies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyImages:
    """A study's instances (spool paths relative) and the image its newest job selected."""

    study_uid: str
    instances: list[tuple[str, str]]  # (SOP Instance UID, spool path)
    selected_sop_instance_uid: str | None


def study_instances(session: Session, study_uid: str) -> StudyImages:
    """The instances of a study and the newest selected image of its jobs.

    Raises
    ------
    StudyNotFound
        When the node holds no study with that UID.
    """
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise StudyNotFound(f"no study with Study Instance UID (0020,000D) {study_uid}")
    inst = [
        (uid, path)
        for uid, path in session.execute(
            select(Instance.sop_instance_uid, Instance.spool_path)
            .where(Instance.study_id == study.id)
            .order_by(Instance.id)
        ).all()
    ]
    selected = session.scalar(
        select(Job.selected_sop_instance_uid)
        .where(Job.study_id == study.id, Job.selected_sop_instance_uid.is_not(None))
        .order_by(Job.id.desc())
        .limit(1)
    )
    return StudyImages(study_uid, inst, selected)


# --- metrics --------------------------------------------------------------------------------


def metric_counts(session: Session) -> tuple[dict[str, int], dict[str, int]]:
    """Jobs by state and deliveries by state (every state present, zeros included)."""
    jobs = {s.value: 0 for s in JobState}
    for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        jobs[JobState(state).value] = int(n)
    deliveries = {s.value: 0 for s in DeliveryState}
    for d_state, n in session.execute(
        select(Delivery.state, func.count()).group_by(Delivery.state)
    ):
        deliveries[DeliveryState(d_state).value] = int(n)
    return jobs, deliveries
