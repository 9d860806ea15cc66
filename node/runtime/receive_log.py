"""The node's receive log: :class:`ReceiveLog` implements
:class:`integration.association_log.AssociationLog` over SQL (:mod:`node.db.receive_log`).

What is written, and when (durability of instances and ingest speed come first):

- an accepted association (PS3.8 7.1): one row at once (outcome ``open``), whose id the
  storage SCP passes to ingest so each stored instance names it (``instances.association_id``);
- a rejected association (A-ASSOCIATE-RJ, PS3.8 9.3.4): one row, outcome ``rejected`` with
  the reason;
- each C-STORE answer (PS3.4 B.2.3): counted in memory per association (accepted, refused,
  by status); a refused request is written at once (``refused_instances``, with the totals
  in the same commit); the totals of accepted requests are written at most every
  ``flush_seconds`` and at the end, so a stored instance costs no second commit;
- the end (A-RELEASE PS3.8 7.2, A-ABORT/A-P-ABORT PS3.8 7.3-7.4): outcome, end time, totals.

Each write is one short transaction, tried once; a failure is logged with its error class
only and never reaches the C-STORE's status (the instance's own commit is ingest's). No
patient data reaches the log or a log line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from integration.association_log import (
    AssociationInfo,
    AssociationOutcome,
    StoreRecord,
)
from node.db import receive_log as receive_db
from node.db.models import utcnow

__all__ = ["DEFAULT_FLUSH_SECONDS", "ReceiveLog"]

LOG = logging.getLogger(__name__)

#: the longest the totals of a busy association wait in memory before they are written
DEFAULT_FLUSH_SECONDS = 5.0


@dataclass
class _Tally:
    accepted: int = 0
    refused: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    flushed_at: float = 0.0

    def add(self, record: StoreRecord) -> None:
        key = f"0x{int(record.status):04X}"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if record.refused:
            self.refused += 1
        else:
            self.accepted += 1

    def counts(self) -> receive_db.Counts:
        return receive_db.Counts(self.accepted, self.refused, dict(self.statuses))


class ReceiveLog:
    """The receive log in SQL (implements ``integration.association_log.AssociationLog``).

    Parameters
    ----------
    session_factory
        Write sessions (``node.db.engine.make_session_factory``).
    clock
        The current UTC time (tests).
    flush_seconds
        Write an open association's totals at most this often (and always at its end).
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        *,
        clock: Callable[[], datetime] = utcnow,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
    ) -> None:
        self.sessions = session_factory
        self.clock = clock
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._tallies: dict[int, _Tally] = {}

    def _failed(self, what: str, exc: BaseException) -> None:
        LOG.warning("receive log: %s not recorded (%s)", what, type(exc).__name__)

    def opened(self, info: AssociationInfo) -> int | None:
        """Record an accepted association; return its id (``None`` if the write failed)."""
        try:
            with self.sessions() as session:
                association_id = receive_db.open_association(session, info, started_at=self.clock())
        except Exception as exc:
            self._failed("association", exc)
            return None
        with self._lock:
            self._tallies[association_id] = _Tally(flushed_at=time.monotonic())
        return association_id

    def rejected(self, info: AssociationInfo, reason: str) -> None:
        """Record a rejected association (A-ASSOCIATE-RJ) with ``reason``."""
        try:
            with self.sessions() as session:
                receive_db.record_rejected(session, info, at=self.clock(), reason=reason)
        except Exception as exc:
            self._failed("rejected association", exc)

    def stored(self, association_id: int, record: StoreRecord) -> None:
        """Count one C-STORE answer; write a refusal at once, the totals when due."""
        now = time.monotonic()
        with self._lock:
            tally = self._tallies.setdefault(association_id, _Tally(flushed_at=now))
            tally.add(record)
            due = record.refused or now - tally.flushed_at >= self.flush_seconds
            if due:
                tally.flushed_at = now
            counts = tally.counts()
        if not due:
            return
        try:
            with self.sessions() as session:
                if record.refused:
                    receive_db.add_refused(
                        session,
                        association_id,
                        at=self.clock(),
                        study_uid=record.study_uid,
                        sop_instance_uid=record.sop_instance_uid,
                        sop_class_uid=record.sop_class_uid,
                        status=record.status,
                        reason=record.reason,
                        counts=counts,
                    )
                else:
                    receive_db.update_counts(session, association_id, counts)
        except Exception as exc:
            self._failed("refused instance" if record.refused else "C-STORE totals", exc)

    def ended(self, association_id: int, outcome: AssociationOutcome, reason: str | None) -> None:
        """Record the association's end, its outcome and its final totals."""
        with self._lock:
            tally = self._tallies.pop(association_id, None)
        try:
            with self.sessions() as session:
                receive_db.end_association(
                    session,
                    association_id,
                    ended_at=self.clock(),
                    outcome=str(outcome),
                    reason=reason,
                    counts=tally.counts() if tally is not None else None,
                )
        except Exception as exc:
            self._failed("association end", exc)
