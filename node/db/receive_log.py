"""The receive log in SQL: every association offered to the storage SCP, and each refused
C-STORE request, with their read views and their retention.

Tables ``associations`` and ``refused_instances`` (:class:`node.db.models.Association`,
:class:`node.db.models.RefusedInstance`); ``instances.association_id`` links a stored
instance to the association that delivered it. An association (PS3.8 7.1) is recorded when
it is accepted (``outcome`` ``open``) or rejected (A-ASSOCIATE-RJ, PS3.8 9.3.4: ``rejected``
with the reason), and ends ``released`` (A-RELEASE, PS3.8 7.2) or ``aborted`` (A-ABORT or
A-P-ABORT, PS3.8 7.3 and 7.4). Its C-STORE counters (PS3.4 B.2.3 statuses) are written as
totals: with each refused instance, every few seconds and at the end, never one commit per
stored instance.

Retention (``receive_log_days``) is :func:`node.db.retention.purge_receive_log`.
Every writer here is one short transaction (:func:`node.db.tx.in_transaction`). No patient
data is stored: UIDs, AE titles, addresses, status codes and the node's own reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session

from integration.association_log import AssociationInfo
from node.db.instance_record import clip
from node.db.models import UID_LEN, Association, Instance, RefusedInstance, Study
from node.db.queries import check_page, contains, page
from node.db.read_models import read_model
from node.db.tx import in_transaction

__all__ = [
    "OUTCOMES",
    "AssociationDetail",
    "AssociationRow",
    "Counts",
    "ReceiveLogFilter",
    "RefusedRow",
    "add_refused",
    "association_detail",
    "end_association",
    "list_associations",
    "open_association",
    "record_rejected",
    "refused_by_association",
    "update_counts",
]

#: what ``associations.outcome`` holds
OUTCOMES = ("open", "released", "aborted", "rejected")
_AE_LEN = 16
_ADDRESS_LEN = 64
_REASON_LEN = 256


@dataclass(frozen=True)
class Counts:
    """An association's C-STORE totals so far.

    Parameters
    ----------
    accepted
        Requests answered Success or Warning (PS3.4 Table B.2-1).
    refused
        Requests answered with a failure status.
    statuses
        Requests by status, ``{"0x0000": 2, "0xA900": 1}``.
    """

    accepted: int = 0
    refused: int = 0
    statuses: Mapping[str, int] = field(default_factory=dict)


def _insert_association(
    session: Session,
    peer: AssociationInfo,
    *,
    started_at: datetime,
    ended_at: datetime | None,
    outcome: str,
    reason: str | None,
) -> int:
    def work() -> int:
        row = Association(
            started_at=started_at,
            ended_at=ended_at,
            calling_ae=clip(peer.calling_ae, _AE_LEN),
            called_ae=clip(peer.called_ae, _AE_LEN),
            address=clip(peer.address, _ADDRESS_LEN),
            port=peer.port,
            tls=peer.tls,
            outcome=outcome,
            reason=clip(reason, _REASON_LEN),
            accepted=0,
            refused=0,
            statuses={},
        )
        session.add(row)
        session.flush()
        return int(row.id)

    return in_transaction(session, work)


def open_association(session: Session, peer: AssociationInfo, *, started_at: datetime) -> int:
    """Record an association the node accepted from ``peer`` (A-ASSOCIATE-AC, outcome
    ``open``); commits; returns its id."""
    return _insert_association(
        session, peer, started_at=started_at, ended_at=None, outcome="open", reason=None
    )


def record_rejected(
    session: Session, peer: AssociationInfo, *, at: datetime, reason: str | None
) -> int:
    """Record an association the node rejected (A-ASSOCIATE-RJ, PS3.8 9.3.4); commits."""
    return _insert_association(
        session, peer, started_at=at, ended_at=at, outcome="rejected", reason=reason
    )


def _count_values(counts: Counts) -> dict[str, Any]:
    return {
        "accepted": counts.accepted,
        "refused": counts.refused,
        "statuses": dict(counts.statuses),
    }


def _write_counts(session: Session, association_id: int, counts: Counts) -> None:
    session.execute(
        update(Association).where(Association.id == association_id).values(**_count_values(counts))
    )


def update_counts(session: Session, association_id: int, counts: Counts) -> None:
    """Write an open association's C-STORE totals; commits."""

    in_transaction(session, lambda: _write_counts(session, association_id, counts))


def add_refused(
    session: Session,
    association_id: int | None,
    *,
    at: datetime,
    study_uid: str | None,
    sop_instance_uid: str | None,
    sop_class_uid: str | None,
    status: int,
    reason: str | None,
    counts: Counts | None = None,
) -> int:
    """Record one refused C-STORE request (and, in the same commit, the association's
    totals when given); returns the row's id."""

    def work() -> int:
        row = RefusedInstance(
            association_id=association_id,
            at=at,
            study_uid=clip(study_uid, UID_LEN),
            sop_instance_uid=clip(sop_instance_uid, UID_LEN),
            sop_class_uid=clip(sop_class_uid, UID_LEN),
            status=int(status),
            reason=clip(reason, _REASON_LEN),
        )
        session.add(row)
        if counts is not None and association_id is not None:
            _write_counts(session, association_id, counts)
        session.flush()
        return int(row.id)

    return in_transaction(session, work)


def end_association(
    session: Session,
    association_id: int,
    *,
    ended_at: datetime,
    outcome: str,
    reason: str | None = None,
    counts: Counts | None = None,
) -> None:
    """Close an association's row: ``released`` or ``aborted``, its end and totals; commits.

    Raises
    ------
    ValueError
        ``outcome`` is not one of :data:`OUTCOMES`.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"association outcome must be one of {OUTCOMES}, got {outcome!r}")

    def work() -> None:
        values: dict[str, Any] = {
            "ended_at": ended_at,
            "outcome": outcome,
            "reason": clip(reason, _REASON_LEN),
        }
        if counts is not None:
            values.update(_count_values(counts))
        session.execute(
            update(Association).where(Association.id == association_id).values(**values)
        )

    in_transaction(session, work)


# --- read views ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AssociationRow:
    """One association of the receive log.

    ``statuses`` counts the C-STORE requests by status (``"0x0000"``, ``"0xA900"``, ...);
    ``accepted`` are Success or Warning, ``refused`` failures (PS3.4 Table B.2-1).
    """

    id: int
    started_at: datetime
    ended_at: datetime | None
    calling_ae: str | None
    called_ae: str | None
    address: str | None
    port: int | None
    tls: bool
    outcome: str
    reason: str | None
    accepted: int
    refused: int
    statuses: dict[str, int]


@dataclass(frozen=True)
class RefusedRow:
    """One refused C-STORE request: its UIDs, the status sent and the node's reason."""

    id: int
    association_id: int | None
    at: datetime
    study_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    status: int
    status_hex: str
    reason: str | None


@dataclass(frozen=True)
class AssociationDetail:
    """An association with its refused instances and the studies it delivered instances of."""

    association: AssociationRow
    refused_instances: list[RefusedRow]
    studies: list[str]


@dataclass(frozen=True)
class ReceiveLogFilter:
    """Which associations to list, newest first.

    Parameters
    ----------
    calling_ae
        Calling AE Title contains this (case-insensitive).
    study_uid
        Delivered an instance of this study, or had a refused request for it.
    outcome
        One of :data:`OUTCOMES`.
    since, until
        Started at or after / before (UTC).
    limit, offset
        The page.
    """

    calling_ae: str | None = None
    study_uid: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    offset: int = 0

    def __post_init__(self) -> None:
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
        check_page(self.limit, self.offset)


def _row(a: Association) -> AssociationRow:
    statuses = {str(k): int(v) for k, v in (a.statuses or {}).items()}
    return read_model(AssociationRow, a, tls=bool(a.tls), statuses=statuses)


def _refused_row(r: RefusedInstance) -> RefusedRow:
    return read_model(RefusedRow, r, status_hex=f"0x{r.status:04X}")


def _filtered(flt: ReceiveLogFilter) -> Select[Any]:
    stmt = select(Association)
    if flt.calling_ae:
        stmt = stmt.where(contains(Association.calling_ae, flt.calling_ae.strip()))
    if flt.outcome:
        stmt = stmt.where(Association.outcome == flt.outcome)
    if flt.since is not None:
        stmt = stmt.where(Association.started_at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(Association.started_at < flt.until)
    if flt.study_uid:
        uid = flt.study_uid.strip()
        delivered = (
            select(Instance.association_id)
            .join(Study, Study.id == Instance.study_id)
            .where(Study.study_instance_uid == uid, Instance.association_id.is_not(None))
        )
        refused = select(RefusedInstance.association_id).where(
            RefusedInstance.study_uid == uid, RefusedInstance.association_id.is_not(None)
        )
        stmt = stmt.where(or_(Association.id.in_(delivered), Association.id.in_(refused)))
    return stmt


def list_associations(session: Session, flt: ReceiveLogFilter) -> tuple[list[AssociationRow], int]:
    """Associations matching ``flt``, newest first, and the number of matches."""
    rows, total = page(
        session,
        _filtered(flt),
        order_by=(Association.started_at.desc(), Association.id.desc()),
        limit=flt.limit,
        offset=flt.offset,
    )
    return [_row(a) for a in rows.scalars()], total


def association_detail(session: Session, association_id: int) -> AssociationDetail | None:
    """One association with its refused instances (oldest first) and the Study Instance
    UIDs it delivered instances of; ``None`` when there is no such association."""
    a = session.get(Association, association_id)
    if a is None:
        return None
    refused = session.scalars(
        select(RefusedInstance)
        .where(RefusedInstance.association_id == association_id)
        .order_by(RefusedInstance.at, RefusedInstance.id)
    )
    studies = session.scalars(
        select(Study.study_instance_uid)
        .join(Instance, Instance.study_id == Study.id)
        .where(Instance.association_id == association_id)
        .distinct()
        .order_by(Study.study_instance_uid)
    )
    return AssociationDetail(
        association=_row(a),
        refused_instances=[_refused_row(r) for r in refused],
        studies=list(studies),
    )


def refused_by_association(
    session: Session, association_ids: list[int], *, per_association: int = 20
) -> dict[int, list[RefusedRow]]:
    """The first ``per_association`` refused instances of each association in
    ``association_ids`` (oldest first), for a page of the list."""
    out: dict[int, list[RefusedRow]] = {i: [] for i in association_ids}
    if not association_ids:
        return out
    rank = (
        func.row_number()
        .over(
            partition_by=RefusedInstance.association_id,
            order_by=(RefusedInstance.at, RefusedInstance.id),
        )
        .label("rank")
    )
    ranked = (
        select(RefusedInstance.id, rank)
        .where(RefusedInstance.association_id.in_(association_ids))
        .subquery()
    )
    rows = session.scalars(
        select(RefusedInstance)
        .join(ranked, ranked.c.id == RefusedInstance.id)
        .where(ranked.c.rank <= per_association)
        .order_by(RefusedInstance.association_id, RefusedInstance.at, RefusedInstance.id)
    )
    for r in rows:
        out.setdefault(int(r.association_id or 0), []).append(_refused_row(r))
    return out
