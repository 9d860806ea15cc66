"""Periodic chores of a node process (APScheduler 3 ``BackgroundScheduler``, in memory).

- study completion sweep (every quarter of the quiet period, 0.2-5 s): completes quiet
  studies and queues their jobs (:func:`node.db.study_completion.complete_quiet_studies`);
- lease expiry (every quarter of the lease, 1-15 s): requeues jobs of dead workers;
- retention (hourly): deletes studies older than ``retention_days`` and their spool files
  (instances and SRs), SR files a crashed worker left half-written, and the receive log's
  associations older than ``receive_log_days``;
- delivery recheck (every ``delivery_recheck_minutes``, 0: off): C-ECHOes each configured
  destination that has failed, not permanent deliveries and re-queues them when it answers
  (:func:`node.runtime.destination_probe.recheck_failed_destinations`).

The schedule is never shared through the database: every node process runs its own chores,
and the repository functions are safe to run concurrently (row locks / ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from node.db import jobs as jobs_db
from node.db import retention as retention_db
from node.db import study_completion as completion_db
from node.db.models import utcnow
from node.runtime.routing import facts_reader
from node.runtime.spool import OUTPUTS_DIR, Spool, incoming_grace
from node.settings import Settings

__all__ = ["STALE_PART_SECONDS", "Chores", "NodeScheduler"]

log = logging.getLogger(__name__)

#: An unfinished SR file (``outputs/.<uid>.<hex>.part``) older than this is a crashed write.
STALE_PART_SECONDS = 3600.0


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


class Chores:
    """The chores themselves, callable directly (tests) or from :class:`NodeScheduler`.

    Parameters
    ----------
    settings
        Node settings (quiet period, max wait, chest rule, retention, spool directory).
    session_factory
        Write-session factory.
    clock
        Returns the current UTC time (tests pass a fake clock).
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.clock = clock

    def sweep_studies(self) -> list[completion_db.CompletionResult]:
        """Complete quiet (or overdue) studies; queue jobs for chest studies."""
        s = self.settings
        with self.session_factory() as session:
            return completion_db.complete_quiet_studies(
                session,
                quiet_seconds=s.study_quiet_seconds,
                max_wait_seconds=s.study_max_wait_seconds,
                now=self.clock(),
                rule=s.chest_rule,
                job_max_attempts=s.job_max_attempts,
                rules=s.routing_rules,
                facts_of=facts_reader(s.routing_rules, s.spool_dir),
            )

    def match_finals(self) -> int:
        """Score the final reports that arrived before their draft and now have one."""
        from node.runtime.finals import FinalIntake

        return FinalIntake(self.settings, self.session_factory).match_pending()

    def expire_leases(self) -> int:
        """Requeue or fail running jobs whose lease has passed."""
        with self.session_factory() as session:
            return jobs_db.expire_leases(session, self.clock())

    def recheck_deliveries(self) -> dict[str, int]:
        """Re-queue failed deliveries of destinations that answer again (C-ECHO / OPTIONS).

        See :func:`node.runtime.destination_probe.recheck_failed_destinations`; returns the
        re-queued count per destination that answered.
        """
        from node.runtime.destination_probe import (
            recheck_failed_destinations,  # imports us, through node.runtime.delivery
        )

        return recheck_failed_destinations(self.settings, self.session_factory)

    def apply_retention(self) -> int:
        """Delete studies older than ``retention_days`` (0 disables) and their spool files.

        The files are the instances and the SRs written for the studies' jobs. Whatever
        ``retention_days`` says, unfinished SR files (``outputs/.*.part``) older than
        :data:`STALE_PART_SECONDS` are deleted too: a worker that died while writing left them
        (an SR takes milliseconds to write); so are staged received files no transfer has
        touched for :func:`node.runtime.spool.incoming_grace` (a receiver died).

        Returns the number of spool files removed (unfinished ones not counted).
        """
        root = self.settings.spool_dir.resolve()
        outputs = root / OUTPUTS_DIR
        self._remove_stale_parts(outputs)
        grace = incoming_grace(self.settings.network_timeout, self.settings.pdu_receive_timeout)
        staged = Spool(root, fsync=False).clean_incoming(grace)
        if staged:
            log.info("retention: removed %d unacknowledged staged files", staged)
        try:
            self.purge_receive_log()
        except Exception as exc:  # the studies' retention runs all the same
            log.warning("retention: receive log not purged: %s", type(exc).__name__)
        days = self.settings.retention_days
        if days <= 0:
            return 0
        cutoff = self.clock() - timedelta(days=days)
        with self.session_factory() as session:
            paths = retention_db.purge_expired_studies(session, older_than=cutoff)
        removed = 0
        for rel in paths:
            path = (root / rel).resolve()
            if not path.is_relative_to(root):
                log.error("retention: spool path %s lies outside the spool; not removed", rel)
                continue
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("retention: cannot remove %s: %s", rel, exc.strerror)
                continue
            if path.parent != outputs:  # SRs lie flat in outputs/, which workers write to
                _remove_empty_parents(path.parent, root)
        if paths:
            log.info("retention: removed %d spool files older than %d days", removed, days)
        return removed

    def purge_receive_log(self) -> int:
        """Delete receive log associations older than ``receive_log_days`` (0 disables)
        with their refused instances (:func:`node.db.retention.purge_receive_log`).

        Returns the number of associations deleted.
        """
        days = self.settings.receive_log_days
        if days <= 0:
            return 0
        cutoff = self.clock() - timedelta(days=days)
        with self.session_factory() as session:
            n = retention_db.purge_receive_log(session, older_than=cutoff)
        if n:
            log.info("retention: removed %d receive log associations older than %d days", n, days)
        return n

    def _remove_stale_parts(self, outputs: Path) -> None:
        cutoff = self.clock().timestamp() - STALE_PART_SECONDS
        removed = 0
        for part in outputs.glob(".*.part"):
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    removed += 1
            except OSError:
                continue  # gone meanwhile, or not ours to delete: the next run retries
        if removed:
            log.info("retention: removed %d unfinished SR files", removed)


def _remove_empty_parents(directory: Path, root: Path) -> None:
    while directory != root and directory.is_relative_to(root):
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _guarded(name: str, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception as exc:  # a chore failing (database down) must not stop the others
            log.warning("chore %s failed: %s: %s", name, type(exc).__name__, exc)

    return run


class NodeScheduler:
    """The node's chores on a ``BackgroundScheduler``; a component with ``start``/``stop``."""

    def __init__(self, chores: Chores) -> None:
        self.chores = chores
        self.scheduler = BackgroundScheduler(
            timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1}
        )
        s = chores.settings
        sweep_every = _clamp(s.study_quiet_seconds / 4, 0.2, 5.0)
        lease_every = _clamp(s.lease_seconds / 4, 1.0, 15.0)
        now = utcnow()
        recheck = s.delivery_recheck_minutes * 60.0
        chore_jobs: list[tuple[str, Callable[[], object], str, float, float]] = [
            # (what, chore, job id, every (s), first run after (s))
            ("study sweep", chores.sweep_studies, "study-sweep", sweep_every, 0.0),
            ("lease expiry", chores.expire_leases, "lease-expiry", lease_every, 0.0),
            ("final report matching", chores.match_finals, "final-match", 30.0, 5.0),
            ("retention", chores.apply_retention, "retention", 3600.0, 60.0),
        ]
        if recheck > 0:
            recheck_job = ("delivery recheck", chores.recheck_deliveries, "delivery-recheck")
            chore_jobs.append((*recheck_job, recheck, recheck))
        for what, chore, job_id, every, first in chore_jobs:
            self.scheduler.add_job(
                _guarded(what, chore),
                "interval",
                seconds=every,
                id=job_id,
                next_run_time=now + timedelta(seconds=first),
            )

    def start(self) -> None:
        """Start running the chores in background threads."""
        self.scheduler.start()

    def stop(self) -> None:
        """Stop scheduling and wait for running chores to finish."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
