"""The job worker: claims queued jobs from SQL under a lease and runs the pipeline.

``settings.worker_concurrency`` threads each loop: wait until the model host is ready,
claim up to ``worker_batch_size`` queued jobs (capped by the ``worker_batch_memory_mb``
estimate of :meth:`node.runtime.modelhost.ModelHost.max_batch_for_memory`), heartbeat their leases
every ``lease_seconds / 3`` while :func:`node.runtime.pipeline.run_batch` works, and go on with the
next batch. A job whose lease is lost (the heartbeat says so) has its outputs abandoned; a
failing job is recorded (transient: queued again, claimable only after an exponential
back-off of ``job_backoff_seconds`` doubling up to ``job_max_backoff_seconds``, while
attempts remain; permanent: failed at once, see :func:`node.runtime.pipeline.is_permanent`) and
never stops the loop.

Lease owners are ``<ctx.owner>/w<n>`` (one per thread, so two threads of a process never
share a lease); :meth:`Worker.stop` releases them (``node.db.jobs.release_leases``)
after the threads end. The first thread also expires stale leases of dead workers every
``lease_seconds / 2`` (as the serve node's chores do), so a standalone ``cxr-node worker``
takes over jobs of a killed worker on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from node.db import jobs as jobs_db
from node.runtime.completion import JobOutcome
from node.runtime.pipeline import retry_delay_seconds, run_batch
from node.runtime.stages import PipelineDeps

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from node.runtime.modelhost import ModelHost
    from node.runtime.service import NodeContext

__all__ = ["Heartbeat", "Worker", "make_worker"]

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews the leases of a set of running jobs every ``interval`` seconds in a thread.

    Parameters
    ----------
    ctx_session_factory
        Write-session factory.
    job_ids
        The jobs held by ``owner``.
    owner
        Lease owner.
    lease_seconds
        New lease length at each renewal.
    interval
        Seconds between renewals (default ``lease_seconds / 3``).
    """

    def __init__(
        self,
        ctx_session_factory: Callable[[], Session],
        job_ids: Iterable[int],
        *,
        owner: str,
        lease_seconds: float,
        interval: float | None = None,
    ) -> None:
        self._sf = ctx_session_factory
        self._jobs = set(job_ids)
        self._lost: set[int] = set()
        self._owner = owner
        self._lease = lease_seconds
        self._interval = interval if interval is not None else max(0.05, lease_seconds / 3.0)
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{owner}", daemon=True)

    def start(self) -> Heartbeat:
        """Start renewing; returns ``self``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing and wait for the thread."""
        self._stop.set()
        self._thread.join(timeout=self._interval + 30.0)

    def lost(self, job_id: int) -> bool:
        """Whether a renewal found the lease of ``job_id`` gone."""
        with self._mutex:
            return job_id in self._lost

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._mutex:
                pending = sorted(self._jobs - self._lost)
            for job_id in pending:
                try:
                    with self._sf() as session:
                        held = jobs_db.heartbeat(session, job_id, self._owner, self._lease)
                except Exception as exc:  # database away: the lease may still be renewed later
                    log.warning("job %s: heartbeat failed (%s)", job_id, type(exc).__name__)
                    continue
                if not held:
                    with self._mutex:
                        self._lost.add(job_id)
                    log.debug("job %s: lease no longer held by %s", job_id, self._owner)


class Worker:
    """The worker component (``start()`` non-blocking, ``stop()`` waits).

    Parameters
    ----------
    ctx
        The node context (settings, session factory, owner, stop event).
    model_host
        The shared model (``ctx.extras["model_host"]``).
    poll_interval
        Seconds to wait when nothing is queued.
    expire_leases
        Whether thread 0 requeues jobs whose lease expired (dead workers).
    """

    def __init__(
        self,
        ctx: NodeContext,
        model_host: ModelHost,
        *,
        poll_interval: float = 0.5,
        expire_leases: bool = True,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.ctx = ctx
        self.settings = ctx.settings
        self.model_host = model_host
        self.poll_interval = poll_interval
        self.expire_leases = expire_leases
        self.deps = PipelineDeps.from_settings(ctx.settings, ctx.session_factory)
        self.owners = [f"{ctx.owner}/w{i}" for i in range(ctx.settings.worker_concurrency)]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counts_lock = threading.Lock()
        self.counts: dict[str, int] = {"done": 0, "failed": 0, "retry": 0, "abandoned": 0}
        self._last_expiry = 0.0

    # --- component ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads (returns at once)."""
        if self._threads:
            return
        for i, owner in enumerate(self.owners):
            t = threading.Thread(
                target=self._loop, args=(i, owner), name=f"worker-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)
        log.info(
            "worker started: %d thread(s), batch size %d, memory budget %s MB",
            len(self.owners),
            self.settings.worker_batch_size,
            self.settings.worker_batch_memory_mb or "unlimited",
        )

    def stop(self, timeout: float = 120.0) -> None:
        """Stop claiming, wait for running batches (up to ``timeout``), release leases."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        for owner in self.owners:
            try:
                with self.ctx.session_factory() as session:
                    n = jobs_db.release_leases(session, owner)
                if n:
                    log.info("released %d job lease(s) of %s", n, owner)
            except Exception as exc:
                log.warning("could not release the leases of %s: %s", owner, exc)
        log.info("worker stopped (%s)", self.counts)

    @property
    def stopping(self) -> bool:
        """Whether the worker or the node is shutting down."""
        return self._stop.is_set() or self.ctx.stop_event.is_set()

    # --- loop -----------------------------------------------------------------------------

    def _batch_limit(self) -> int:
        try:
            return self.model_host.max_batch_for_memory(
                budget_mb=self.settings.worker_batch_memory_mb,
                max_new_tokens=self.settings.generation_max_new_tokens,
                limit=self.settings.worker_batch_size,
            )
        except Exception as exc:
            log.warning("batch memory estimate failed (%s); batch of 1", exc)
            return 1

    def _maybe_expire(self) -> None:
        period = max(0.5, self.settings.lease_seconds / 2.0)
        if time.monotonic() - self._last_expiry < period:
            return
        self._last_expiry = time.monotonic()
        try:
            with self.ctx.session_factory() as session:
                jobs_db.expire_leases(session)
        except Exception as exc:
            log.warning("lease expiry failed: %s", type(exc).__name__)

    def _model_name(self) -> str | None:
        """The loaded bundle's ``model_name``: jobs routed to another model are not claimed."""
        try:
            return str(self.model_host.runtime.model_name)
        except Exception:
            return None

    def claim(self, owner: str, limit: int) -> list[int]:
        """Claim up to ``limit`` queued jobs for ``owner``; return their ids."""
        ids: list[int] = []
        while len(ids) < limit and not self.stopping:
            with self.ctx.session_factory() as session:
                job = jobs_db.claim_next_job(
                    session,
                    owner=owner,
                    lease_seconds=self.settings.lease_seconds,
                    model=self._model_name(),
                )
            if job is None:
                break
            ids.append(job.id)
            log.info(
                "job %s claimed by %s (attempt %d/%d)",
                job.id,
                owner,
                job.attempts,
                job.max_attempts,
            )
        return ids

    def _loop(self, index: int, owner: str) -> None:
        while not self.stopping:
            if not self.model_host.ready:
                if self.model_host.error is not None:
                    self._stop.wait(max(self.poll_interval, 5.0))
                else:
                    self.model_host.wait_ready(self.poll_interval)
                continue
            if index == 0 and self.expire_leases:
                self._maybe_expire()
            try:
                ids = self.claim(owner, self._batch_limit())
            except Exception as exc:
                log.warning("claiming jobs failed (%s); retrying", type(exc).__name__)
                self._stop.wait(self.poll_interval)
                continue
            if not ids:
                self._stop.wait(self.poll_interval)
                continue
            self.run_jobs(owner, ids)

    def run_jobs(self, owner: str, job_ids: list[int]) -> list[JobOutcome]:
        """Run claimed jobs with a heartbeat; record each outcome; never raises."""
        hb = Heartbeat(
            self.ctx.session_factory,
            job_ids,
            owner=owner,
            lease_seconds=self.settings.lease_seconds,
        ).start()
        outcomes: list[JobOutcome] = []
        try:
            outcomes = run_batch(
                self.deps, job_ids, self.model_host, owner=owner, lease_lost=hb.lost
            )
        except Exception:
            log.exception("batch of jobs %s failed outside the pipeline", job_ids)
            for job_id in job_ids:
                try:
                    with self.ctx.session_factory() as session:
                        jobs_db.fail_job(
                            session,
                            job_id,
                            owner=owner,
                            error="worker error",
                            retry=True,
                            retry_delay=lambda n: retry_delay_seconds(self.settings, n),
                        )
                except Exception:
                    pass
        finally:
            hb.stop()
        with self._counts_lock:
            for o in outcomes:
                self.counts[o.status] = self.counts.get(o.status, 0) + 1
        return outcomes


def make_worker(ctx: NodeContext) -> Worker:
    """Component factory: a :class:`Worker` using ``ctx.extras["model_host"]``.

    Raises
    ------
    RuntimeError
        When no model host was started before the worker.
    """
    host = ctx.extras.get("model_host")
    if host is None:
        raise RuntimeError("the worker needs the model host: start make_model_host first")
    return Worker(ctx, host)
