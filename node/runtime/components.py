"""Which components a process runs: ``cxr-node serve`` beside its storage SCP
(:func:`default_components`, in start order) and ``cxr-node worker`` (:func:`run_worker`).

Each entry is a factory called with the node's :class:`~node.runtime.service.NodeContext`; the
model host comes first so that the worker and the API find it in ``ctx.extras``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import inspect

from node.db import jobs as jobs_db
from node.db.engine import engine_from_settings, make_session_factory
from node.runtime.service import Component, ComponentOrFactory, NodeContext, node_owner_id
from node.runtime.signals import install_stop_signals
from node.settings import Settings

__all__ = ["default_components", "run_worker"]

log = logging.getLogger(__name__)


def default_components(
    settings: Settings, *, worker: bool = True, api: bool | None = None
) -> list[ComponentOrFactory]:
    """Return the component factories for ``serve`` under ``settings``.

    Parameters
    ----------
    settings
        The node's settings: no model directory means no model host and no worker (the node
        then only receives and queues); ``hl7_listen`` adds the MLLP listener for final
        reports; ``api_enabled`` turns the admin API on.
    worker
        Run the job worker in this process (``serve --no-worker``: a receiver or API
        process beside separate ``cxr-node worker`` processes).
    api
        Override ``settings.api_enabled``.
    """
    from node.runtime.delivery import make_delivery

    items: list[ComponentOrFactory] = []
    if settings.model_dir is not None:
        from node.runtime.modelhost import make_model_host

        items.append(make_model_host)
        if worker:
            from node.runtime.worker import make_worker

            items.append(make_worker)
    items.append(make_delivery)
    if settings.hl7_listen is not None:
        from node.runtime.finals import make_hl7_listener

        items.append(make_hl7_listener)
    if settings.api_enabled if api is None else api:
        from node.api.server import make_api_server

        items.append(make_api_server)
    return items


def run_worker(
    settings: Settings, *, stop_event: threading.Event | None = None, delivery: bool = False
) -> int:
    """Run the model host and the worker (and optionally delivery) until stopped.

    Parameters
    ----------
    settings
        Validated settings (``model_dir`` must be set).
    stop_event
        Set it to stop; SIGTERM/SIGINT set it when running in the main thread.
    delivery
        Also run the delivery component (``node.runtime.delivery.make_delivery``).

    Returns
    -------
    int
        Exit code: 0 after a clean stop, 1 when the database has no node schema.
    """
    stop_event = stop_event or threading.Event()
    restore = install_stop_signals(stop_event, what="stopping the worker")
    settings.prepare_runtime()
    engine = engine_from_settings(settings)
    try:
        if not inspect(engine).has_table("jobs"):
            log.error("database has no node schema: run `cxr-node db upgrade` first")
            return 1
        owner = node_owner_id()
        ctx = NodeContext(settings, engine, make_session_factory(engine), owner, stop_event)
        started: list[Component] = []
        try:
            from node.runtime.modelhost import make_model_host
            from node.runtime.worker import make_worker

            host = make_model_host(ctx)
            host.start()
            started.append(host)
            worker = make_worker(ctx)
            worker.start()
            started.append(worker)
            if delivery:
                from node.runtime.delivery import make_delivery

                sender: Any = make_delivery(ctx)
                sender.start()
                started.append(sender)
            log.info("worker process ready (owner %s)", owner)
            while not stop_event.wait(0.2):
                pass
        finally:
            for component in reversed(started):
                try:
                    component.stop()
                except Exception:
                    log.exception("component %s failed to stop", type(component).__name__)
            with ctx.session_factory() as session:
                jobs_db.release_leases(session, owner)
        return 0
    finally:
        engine.dispose()
        restore()
