"""The sender: delivers every queued outbound object, with retries. The only way out.

The worker (:func:`node.runtime.outputs.build_outputs`), a withdrawal
(:func:`node.runtime.withdrawal.withdraw`) and the API (a synthetic Secondary Capture sent on
request) call :func:`enqueue_deliveries` once the object's file is written: one
``pending`` row per (destination, object) (:mod:`node.db.deliveries`).
:class:`DeliveryComponent` is a loop (one thread, plus a small pool for parallel sends)
that every ``poll_seconds`` (and at once when woken by an enqueue in this process) claims
the due rows and sends each one by its destination's kind
(:class:`node.runtime.sending.Transport`):

- DIMSE destinations (``AET@host:port``) with C-STORE (PS3.4 Annex B) through
  :func:`integration.scu.send_dataset` (calling AE = ``ae_title``, the node's ACSE / DIMSE /
  network timeouts, DICOM TLS per PS3.15 B.1 when ``tls_destinations`` is on);
- STOW-RS destinations (http(s) URLs) through :func:`integration.stow.stow` (PS3.18 §10.5);
- HL7 destinations (``mllp://``) through :func:`integration.mllp.send_mllp`, the ACK
  judged by :func:`integration.hl7_ack.check_ack` (AA/CA sent; AE/AR transient or
  permanent by their ERR-3 codes);
- FHIR destinations (``fhir+http(s)://``) through
  :func:`integration.fhir_send.send_transaction` (FHIR RESTful API, transaction).

The options of a destination (objects, HL7 receiving application, FHIR bearer token) come
from the configured destination whose text form the row names.

Outcomes: stored (success or warning status) -> ``sent`` with ``sent_at``; a transient
failure (:attr:`integration.errors.DeliveryError.transient`: connection refused, association
rejected-transient or aborted, timeout, 0xA7xx out of resources, HTTP 5xx/408/429) -> stays
``pending``, due again after ``delivery_backoff_seconds * 2**(attempts-1)`` (capped at
``delivery_max_backoff_seconds``, with up to 10 % jitter), for ``delivery_retry_hours`` from
the start of the round of attempts (``queued_at``: enqueue, re-send or re-queue; the last
attempt falls on the horizon); a transient failure at or past the horizon (or on attempt
``delivery_max_attempts`` when that optional cap is set) -> ``failed`` with the reason; a
permanent failure (0xA9xx, 0xCxxx, no presentation context, rejected-permanent, HTTP 4xx) or
a missing file -> ``failed`` at once, marked ``permanent_failure``. So a PACS that is down
when the SR is ready gets it when it comes back within the horizon; one down for longer gets
it when it answers again:
:func:`node.runtime.destination_probe.recheck_failed_destinations` (a chore of
:mod:`node.runtime.scheduler`, every ``delivery_recheck_minutes``) C-ECHOes (PS3.4 Annex A) each
configured destination that has failed, not permanent deliveries (STOW-RS and FHIR: an HTTP
OPTIONS request answered below 500; HL7: a TCP connection) and re-queues them when it
answers (audited).
Each claim records when its attempt started (``last_attempt_at``, shown with ``attempts`` and
``last_error`` by the API, the console and ``cxr-node jobs show``). A claim given back unsent
at shutdown is not counted; if it was the first, ``last_attempt_at`` goes back to empty.

Logs name the delivery, the job, the destination, the object and its UID (SOP Instance UID,
MSH-10) and the outcome; never report text or patient data.
"""

from __future__ import annotations

import logging
import random
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from integration.errors import DeliveryError
from node import metrics
from node.db import deliveries as deliveries_db
from node.db.deliveries import DestinationLike, Outbound
from node.db.models import Delivery, utcnow
from node.runtime.sending import Transport, object_uid
from node.runtime.service import NodeContext
from node.settings import Settings

__all__ = [
    "DeliveryComponent",
    "DeliveryOutcome",
    "backoff_seconds",
    "enqueue_deliveries",
    "make_delivery",
    "wake_senders",
]

log = logging.getLogger(__name__)
_LABELS = {
    "sr": "SR",
    "basic-sr": "Basic Text SR",
    "pdf": "PDF",
    "report": "report",
    "withdrawal": "withdrawal",
    "sc": "Secondary Capture",
}

# live senders of this process, woken by enqueue_deliveries
_SENDERS: weakref.WeakSet[DeliveryComponent] = weakref.WeakSet()
_SENDERS_LOCK = threading.Lock()


def wake_senders() -> None:
    """Wake every running :class:`DeliveryComponent` of this process (new work is due)."""
    with _SENDERS_LOCK:
        senders = list(_SENDERS)
    for sender in senders:
        sender.wake()


def enqueue_deliveries(
    session: Session,
    *,
    job_id: int | None,
    sr_path: str | Path | None = None,
    destinations: Sequence[DestinationLike] = (),
    items: Sequence[Outbound] = (),
    supersede: bool = False,
    owner: str | None = None,
) -> list[int]:
    """Queue objects for destinations and wake the senders of this process.

    See :func:`node.db.deliveries.enqueue_deliveries` (idempotent per job, destination
    and object; commits).

    Parameters
    ----------
    session
        A write session.
    job_id
        The job whose objects are delivered (``None``: a synthetic Secondary Capture).
    sr_path, destinations
        Shorthand: the SR Part 10 file (absolute, or relative to ``spool_dir``) for each
        destination.
    items
        The objects and their destinations.
    supersede
        The objects are the job's draft: the study's older drafts' rows not yet sent to
        these destinations are cancelled as the job is done (audited; see
        :func:`node.db.deliveries.enqueue_deliveries`).
    owner
        The worker holding the running job: nothing is queued unless it still does
        (raises :class:`~node.db.jobs.LeaseLost`).

    Returns
    -------
    list[int]
        The delivery ids.
    """
    ids = deliveries_db.enqueue_deliveries(
        session,
        job_id=job_id,
        sr_path=str(sr_path) if sr_path is not None else None,
        destinations=destinations,
        items=items,
        supersede=supersede,
        owner=owner,
    )
    wake_senders()
    return ids


def backoff_seconds(
    attempts: int, *, base: float, cap: float, jitter: float = 0.1, rng: random.Random | None = None
) -> float:
    """Delay before the next attempt after ``attempts`` failed ones (exponential, capped).

    ``base * 2**(attempts - 1)``, multiplied by a random factor in ``[1 - jitter, 1 + jitter]``
    (so that many deliveries failing together do not retry in lock-step), never above ``cap``.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    raw = base * 2.0 ** min(attempts - 1, 62)
    factor = 1.0 + (rng or random).uniform(-jitter, jitter)
    return float(min(min(raw, cap) * factor, cap))


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one send of one delivery came to (for logs and tests)."""

    delivery_id: int
    destination: str
    state: str  # "sent", "retry", "failed" or "lost" (claim no longer held)
    message: str
    sr_uid: str | None = None


def _describe(row: Delivery, uid: str | None) -> str:
    """``delivery <id> (job <id>): <object> <UID> to <destination>``, for the logs."""
    what = _LABELS.get(row.object.value, row.object.value)
    return f"delivery {row.id} (job {row.job_id}): {what} {uid} to {row.destination}"


class DeliveryComponent:
    """The node's SR sender (a :class:`~node.runtime.service.Component`).

    Parameters
    ----------
    ctx
        The node context (settings, session factory, owner id, stop event).
    poll_seconds
        How often due deliveries are looked for when not woken.
    max_parallel
        Sends in flight at once (one association or HTTP request each).
    lease_seconds
        How long a claim holds a row; by default longer than the slowest possible send
        (connect + ACSE + DIMSE + network timeouts, plus a margin).
    """

    def __init__(
        self,
        ctx: NodeContext,
        *,
        poll_seconds: float = 1.0,
        max_parallel: int = 4,
        lease_seconds: float | None = None,
    ) -> None:
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        if max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
        s = ctx.settings
        self.ctx = ctx
        self.settings: Settings = s
        self.poll_seconds = poll_seconds
        self.max_parallel = max_parallel
        # built once, at construction: a TLS misconfiguration fails start-up, not each send
        self._transport = Transport(s)
        self.connection_timeout = self._transport.connection_timeout
        self.lease_seconds = lease_seconds or (
            self.connection_timeout + s.acse_timeout + 2 * s.dimse_timeout + s.network_timeout + 30
        )
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[Future[DeliveryOutcome]] = set()
        self._lock = threading.Lock()
        self.outcomes: list[DeliveryOutcome] = []  # the most recent outcomes (bounded)

    # --- Component ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (non-blocking)."""
        if self._thread is not None:
            return
        self._pool = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="cxr-delivery")
        self._thread = threading.Thread(target=self._run, name="cxr-delivery", daemon=True)
        with _SENDERS_LOCK:
            _SENDERS.add(self)
        self._thread.start()
        log.info(
            "delivery sender started: %d destination(s), retrying for %g h%s, TLS %s",
            len(self.settings.destinations),
            self.settings.delivery_retry_hours,
            ""
            if self.settings.delivery_max_attempts is None
            else f" or {self.settings.delivery_max_attempts} attempts",
            "on" if self._transport.dicom_tls is not None else "off",
        )

    def stop(self) -> None:
        """Stop claiming, wait for the sends in flight (bounded by their timeouts)."""
        self._stopping.set()
        self._wake.set()
        with _SENDERS_LOCK:
            _SENDERS.discard(self)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._transport.close()

    def wake(self) -> None:
        """Look for due deliveries now instead of at the next poll."""
        self._wake.set()

    # --- loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set() and not self.ctx.stop_event.is_set():
            self._wake.clear()
            claimed = 0
            try:
                claimed = self._dispatch()
            except Exception:  # the database may be briefly unreachable: try again later
                log.exception("delivery sender: claiming due deliveries failed")
            if claimed == 0 or self._free_slots() == 0:
                self._wake.wait(self.poll_seconds)

    def _free_slots(self) -> int:
        with self._lock:
            self._inflight = {f for f in self._inflight if not f.done()}
            return self.max_parallel - len(self._inflight)

    def _claim(self, limit: int) -> list[Delivery]:
        with self.ctx.session_factory() as session:
            return deliveries_db.claim_due_deliveries(
                session, limit=limit, lease_seconds=self.lease_seconds, owner=self.ctx.owner
            )

    def _dispatch(self) -> int:
        free = self._free_slots()
        if free <= 0 or self._pool is None:
            return 0
        rows = self._claim(free)
        for row in rows:
            future = self._pool.submit(self.deliver, row)
            future.add_done_callback(lambda _f: self._wake.set())
            with self._lock:
                self._inflight.add(future)
        return len(rows)

    def run_once(self) -> list[DeliveryOutcome]:
        """Claim the due deliveries and send them in this thread (tools and tests)."""
        return [self.deliver(row) for row in self._claim(self.max_parallel)]

    # --- one send ---------------------------------------------------------------------------

    def _sr_file(self, row: Delivery) -> Path | None:
        if not row.sr_path:
            return None
        path = Path(row.sr_path)
        return path if path.is_absolute() else self.settings.spool_dir / path

    def deliver(self, row: Delivery) -> DeliveryOutcome:
        """Send one claimed delivery and record the outcome (never raises)."""
        try:
            outcome = self._deliver(row)
        except Exception as exc:  # a bug or the database: the lease passes, the row returns
            log.exception("delivery %s to %s: unexpected error", row.id, row.destination)
            outcome = DeliveryOutcome(row.id, row.destination, "lost", type(exc).__name__)
        with self._lock:
            self.outcomes.append(outcome)
            del self.outcomes[:-1000]
        return outcome

    def _deliver(self, row: Delivery) -> DeliveryOutcome:
        claimed_until = row.next_attempt_at
        path = self._sr_file(row)
        if path is None or not path.is_file():
            what = _LABELS.get(row.object.value, row.object.value)
            reason = f"{what} file missing: {path or '(no path recorded)'} no longer exists"
            metrics.count_delivery_failure(row.kind.value, transient=False)
            return self._record_failed(row, claimed_until, reason, row.object_uid, permanent=True)
        uid = object_uid(row, path)
        try:
            sent = self._transport.send(row, path, uid)
        except DeliveryError as exc:
            return self._record_error(row, claimed_until, str(exc), exc.transient, uid)
        except Exception as exc:  # unknown: assume transient, bounded by max attempts
            return self._record_error(row, claimed_until, f"{type(exc).__name__}: {exc}", True, uid)
        with self.ctx.session_factory() as session:
            ok = deliveries_db.mark_sent(
                session, row.id, claimed_until=claimed_until, note=sent.note
            )
        state = "sent" if ok else "lost"
        log.info("%s: %s (%s, attempt %d)", _describe(row, uid), state, sent.status, row.attempts)
        return DeliveryOutcome(row.id, row.destination, state, sent.message, uid)

    # --- outcomes ---------------------------------------------------------------------------

    def _record_error(
        self,
        row: Delivery,
        claimed_until: datetime | None,
        error: str,
        transient: bool,
        sr_uid: str | None,
    ) -> DeliveryOutcome:
        """A failed send: failed at once when permanent, else retried until the horizon."""
        s = self.settings
        metrics.count_delivery_failure(row.kind.value, transient=transient)
        if not transient:
            return self._record_failed(
                row, claimed_until, f"permanent failure: {error}", sr_uid, permanent=True
            )
        now = utcnow()
        since = row.queued_at or row.created_at
        horizon = since + timedelta(hours=s.delivery_retry_hours)
        capped = s.delivery_max_attempts is not None and row.attempts >= s.delivery_max_attempts
        if now >= horizon or capped:
            hours = (now - since).total_seconds() / 3600
            reason = (
                f"gave up after {row.attempts} attempts over {hours:.2f} h; last error: {error}"
            )
            return self._record_failed(row, claimed_until, reason, sr_uid)
        return self._record_retry(row, claimed_until, error, sr_uid, now=now, horizon=horizon)

    def _record_retry(
        self,
        row: Delivery,
        claimed_until: datetime | None,
        error: str,
        sr_uid: str | None,
        *,
        now: datetime,
        horizon: datetime,
    ) -> DeliveryOutcome:
        """Due again after the back-off (:func:`backoff_seconds`), at the latest at ``horizon``."""
        s = self.settings
        delay = backoff_seconds(
            row.attempts, base=s.delivery_backoff_seconds, cap=s.delivery_max_backoff_seconds
        )
        due = min(now + timedelta(seconds=delay), horizon)  # the last attempt: at the horizon
        until = horizon.isoformat(timespec="seconds")
        message = f"attempt {row.attempts} failed (retrying until {until}): {error}"
        with self.ctx.session_factory() as session:
            ok = deliveries_db.mark_retry(
                session, row.id, error=message, next_attempt_at=due, claimed_until=claimed_until
            )
        log.warning(
            "%s: retry in %.1f s (attempt %d, until %s): %s",
            _describe(row, sr_uid),
            (due - now).total_seconds(),
            row.attempts,
            until,
            error,
        )
        return DeliveryOutcome(row.id, row.destination, "retry" if ok else "lost", message, sr_uid)

    def _record_failed(
        self,
        row: Delivery,
        claimed_until: datetime | None,
        reason: str,
        sr_uid: str | None,
        *,
        permanent: bool = False,
    ) -> DeliveryOutcome:
        with self.ctx.session_factory() as session:
            ok = deliveries_db.mark_failed(
                session, row.id, error=reason, claimed_until=claimed_until, permanent=permanent
            )
        log.error("%s: failed (attempt %d): %s", _describe(row, sr_uid), row.attempts, reason)
        return DeliveryOutcome(row.id, row.destination, "failed" if ok else "lost", reason, sr_uid)


def make_delivery(ctx: NodeContext) -> DeliveryComponent:
    """Component factory for ``cxr-node serve`` (see :mod:`node.runtime.components`).

    The sender is put in ``ctx.extras["delivery"]`` (the API may wake it after a re-send).
    """
    component = DeliveryComponent(ctx)
    ctx.extras["delivery"] = component
    return component
