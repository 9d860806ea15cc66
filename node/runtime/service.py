"""The ``cxr-node serve`` process: database, storage SCP, chores and pluggable components.

Start-up: log the effective configuration once, check the spool, create or migrate the
database, start the storage SCP (``integration.ae`` + ``integration.scp`` + ``node.runtime.ingest``;
temporary files, received data sets among them, go to the spool's staging folder), start the
chores (:mod:`node.runtime.scheduler`) and any extra components (worker, HTTP API), then
log ``node ready``. Shutdown on SIGTERM/SIGINT or ``stop_event``: stop accepting
associations, let in-flight ones finish (up to a grace period; a second signal cuts it
short), stop the components and chores, release this process's job leases.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from integration.ae import build_storage_ae
from integration.scp import handlers as scp_handlers
from node.db import jobs as jobs_db
from node.db.engine import engine_from_settings, make_session_factory
from node.db.migrate import upgrade
from node.runtime.ingest import IngestSink
from node.runtime.scheduler import Chores, NodeScheduler
from node.runtime.signals import install_stop_signals
from node.runtime.spool import INCOMING, Spool
from node.settings import Settings
from node.tls import server_context

__all__ = ["Component", "NodeContext", "node_owner_id", "run_node", "stage_tempfiles_in_spool"]

log = logging.getLogger(__name__)


@runtime_checkable
class Component(Protocol):
    """Something the node starts after the SCP and stops before releasing leases."""

    def start(self) -> None:
        """Start (non-blocking)."""

    def stop(self) -> None:
        """Stop and wait until stopped."""


@dataclass
class NodeContext:
    """What a component factory receives: the node's shared resources."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    owner: str
    stop_event: threading.Event
    extras: dict[str, Any] = field(default_factory=dict)


ComponentOrFactory = Component | Callable[[NodeContext], Component]


def node_owner_id() -> str:
    """A lease owner id unique to this process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _build_scp(settings: Settings, session_factory: sessionmaker[Session]) -> tuple[Any, Any]:
    """Build the storage AE and its handlers (INGEST's API); return ``(ae, handlers)``.

    With ``tls_cert_file`` set, the AE serves DICOM TLS only (:func:`node.tls.server_context`).
    Every association and C-STORE answer goes to the receive log
    (:class:`node.runtime.receive_log.ReceiveLog`).
    """
    from node.runtime.finals import FinalIntake, ReportSink
    from node.runtime.receive_log import ReceiveLog

    spool = Spool(settings.spool_dir)
    ingest = IngestSink(settings=settings, session_factory=session_factory, spool=spool)
    # final reports (verified SRs, and SR/PDF from report_sources) leave the stream here
    sink = ReportSink(
        ingest, FinalIntake(settings, session_factory), frozenset(settings.report_sources)
    )
    ae = build_storage_ae(
        ae_title=settings.ae_title,
        allowed_aes=settings.allowed_aes,
        max_associations=settings.max_associations,
        max_associations_per_address=settings.max_associations_per_address,
        acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout,
        association_request_timeout=settings.association_request_timeout,
        pdu_receive_timeout=settings.pdu_receive_timeout,
        maximum_pdu_size=settings.max_pdu_size,
        tls_handshake_timeout=settings.tls_handshake_timeout,
        ssl_context=server_context(settings),
        association_log=ReceiveLog(session_factory),
        reuse_port=settings.reuse_port,
    )
    return ae, scp_handlers(sink)


def stage_tempfiles_in_spool(spool_dir: Path) -> Callable[[], None]:
    """Point this process's temporary files at the spool's staging folder; return an undo.

    pynetdicom writes every incoming C-STORE data set to a ``tempfile.NamedTemporaryFile``
    (``STORE_RECV_CHUNKED_DATASET``, set by :func:`integration.ae.build_storage_ae`) in
    ``tempfile.gettempdir()``, by default ``$TMPDIR`` or ``/tmp``: patient data outside the
    spool, on a file system ``min_free_disk_mb`` does not watch, left behind by every
    aborted transfer. Setting ``tempfile.tempdir`` (documented in :mod:`tempfile` as the
    default ``dir`` of every function there) puts those files in ``<spool>/.incoming``: on
    the spool's file system (the handler renames them into place, no copy), 0600 as all
    temporary files, removed after an abort (:func:`integration.scp.handle_conn_close`)
    and at the next start (:meth:`node.runtime.spool.Spool.clean_incoming`). It is process-wide:
    any other temporary file of ``cxr-node serve`` lands there too, which keeps patient data
    the model or the API might spool under the spool as well.

    Parameters
    ----------
    spool_dir
        The spool root (``spool_dir``); its ``.incoming`` folder must exist.

    Returns
    -------
    Callable[[], None]
        Restores the previous ``tempfile.tempdir``.
    """
    previous = tempfile.tempdir
    tempfile.tempdir = str(Path(spool_dir).absolute() / INCOMING)

    def restore() -> None:
        tempfile.tempdir = previous

    return restore


def _drain(server: Any, *, grace_seconds: float, force_event: threading.Event) -> int:
    """Wait for in-flight associations to end; abort what is left after the grace period."""
    deadline = time.monotonic() + grace_seconds
    active = []
    for assoc in server.active_associations:
        if assoc.is_established:
            active.append(assoc)
        else:
            # a bare TCP connection (a port probe) or a negotiation not yet accepted: nothing
            # in flight to finish; it would otherwise linger until the ACSE timeout
            assoc.abort()
    if active:
        log.info("waiting up to %.0f s for %d in-flight associations", grace_seconds, len(active))
    while active and time.monotonic() < deadline and not force_event.is_set():
        time.sleep(0.05)
        active = [a for a in active if a.is_alive()]
    for assoc in active:
        log.warning("aborting association with %s", getattr(assoc.requestor, "ae_title", "?"))
        assoc.abort()
    return len(active)


def run_node(
    settings: Settings,
    *,
    stop_event: threading.Event | None = None,
    extra_components: Iterable[ComponentOrFactory] = (),
    shutdown_grace_seconds: float | None = None,
) -> int:
    """Run the node in the foreground until ``stop_event`` is set or SIGTERM/SIGINT arrives.

    Parameters
    ----------
    settings
        Validated settings.
    stop_event
        Set it to stop the node (tests, embedding); signals set it too when running in the
        main thread.
    extra_components
        Components (``start()``/``stop()``), or factories called with a
        :class:`NodeContext` that return one; started in order after the SCP and chores,
        stopped in reverse order.
    shutdown_grace_seconds
        How long in-flight associations may take to finish; defaults to the DIMSE timeout.

    Returns
    -------
    int
        Process exit code (0 after a clean shutdown).
    """
    stop_event = stop_event or threading.Event()
    force_event = threading.Event()
    restore_signals = install_stop_signals(stop_event, force_event)
    grace = settings.dimse_timeout if shutdown_grace_seconds is None else shutdown_grace_seconds
    log.info("effective configuration: %s", settings.public_summary())
    started: list[Component] = []
    server: Any = None
    ae: Any = None
    scheduler: NodeScheduler | None = None
    restore_tempdir: Callable[[], None] | None = None
    owner = node_owner_id()
    settings.prepare_runtime()
    revision = upgrade(settings.database_url)
    log.info("database at revision %s (%s)", revision, settings.database_backend)
    engine = engine_from_settings(settings)
    session_factory = make_session_factory(engine)
    try:
        ae, handlers = _build_scp(settings, session_factory)
        restore_tempdir = stage_tempfiles_in_spool(settings.spool_dir)  # received data
        server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
        scheduler = NodeScheduler(Chores(settings, session_factory))
        scheduler.start()
        ctx = NodeContext(settings, engine, session_factory, owner, stop_event)
        for item in extra_components:
            component = item if isinstance(item, Component) else item(ctx)
            component.start()
            started.append(component)
        log.info(
            "node ready: AE title %s listening on %s:%d (owner %s)",
            settings.ae_title,
            settings.host,
            settings.port,
            owner,
        )
        # a short timeout: a signal delivered to another thread only runs its Python handler
        # once the main thread wakes up, and a bare wait() may never wake
        while not stop_event.wait(0.2):
            pass
        return 0
    finally:
        log.info("node stopping")
        if server is not None:
            server.shutdown()  # stop accepting; the listening socket is closed
            _drain(server, grace_seconds=grace, force_event=force_event)
        for component in reversed(started):
            try:
                component.stop()
            except Exception:
                log.exception("component %s failed to stop", type(component).__name__)
        if scheduler is not None:
            scheduler.stop()
        try:
            with session_factory() as session:
                n = jobs_db.release_leases(session, owner)
            if n:
                log.info("released %d job leases", n)
        except Exception as exc:
            log.warning("could not release job leases: %s", exc)
        if ae is not None:
            ae.shutdown()
        if restore_tempdir is not None:
            restore_tempdir()
        engine.dispose()
        restore_signals()
        log.info("node stopped")
