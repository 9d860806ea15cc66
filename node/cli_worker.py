"""``cxr-node worker``: run only the job worker (no storage SCP) until SIGTERM/SIGINT.

For multi-machine deployments (ingest on one host, GPU workers on others, one PostgreSQL
database and a shared spool) and for crash tests. It loads the configured model bundle once,
claims jobs from the configured database, writes SRs under ``<spool>/outputs`` and queues
their deliveries; the serve node's delivery component sends them (``--delivery`` sends from
here as well). Stale leases of dead workers are requeued by the worker itself.

Registration in ``node/cli.py`` (lead): ``app.command("worker")(cli_worker.command)``.
Standalone: ``python -m node.cli_worker [--config FILE]``.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from sqlalchemy import inspect

from node.db import repository as repo
from node.db.engine import engine_from_settings, make_session_factory
from node.filemodes import apply_private_umask
from node.logging_setup import configure_logging
from node.modelhost import make_model_host
from node.service import Component, NodeContext, node_owner_id
from node.settings import ConfigError, Settings, load_settings
from node.worker import make_worker

__all__ = ["app", "command", "run_worker"]

log = logging.getLogger(__name__)


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
        Also run the delivery component (``node.delivery.make_delivery``).

    Returns
    -------
    int
        Exit code: 0 after a clean stop, 1 when the database has no node schema.
    """
    stop_event = stop_event or threading.Event()
    restore = _install_signals(stop_event)
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
            host = make_model_host(ctx)
            host.start()
            started.append(host)
            worker = make_worker(ctx)
            worker.start()
            started.append(worker)
            if delivery:
                from node.delivery import make_delivery

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
                repo.release_leases(session, owner)
        return 0
    finally:
        engine.dispose()
        restore()


def _install_signals(stop_event: threading.Event) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping the worker", signal.Signals(signum).name)
        stop_event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML configuration file.", dir_okay=False),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Worker threads (overrides worker_concurrency).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Jobs per batch (overrides worker_batch_size).")
    ] = None,
    delivery: Annotated[
        bool, typer.Option("--delivery/--no-delivery", help="Also send queued SRs from here.")
    ] = False,
) -> None:
    """Run only the job worker (no DICOM SCP) against the configured database and model."""
    if config is None:
        try:  # the root ``cxr-node --config`` option when registered in node.cli
            from node.cli import _state

            value = _state.get("config")
            config = Path(value) if value is not None else None
        except ImportError:  # pragma: no cover
            pass
    overrides: dict[str, Any] = {}
    if concurrency is not None:
        overrides["worker_concurrency"] = concurrency
    if batch_size is not None:
        overrides["worker_batch_size"] = batch_size
    try:
        settings = load_settings(config, **overrides)
        if settings.model_dir is None:
            raise ConfigError("model_dir: the worker needs a model bundle (CXR_NODE_MODEL_DIR)")
    except ConfigError as exc:
        typer.echo(f"configuration refused: {exc}", err=True)
        raise typer.Exit(2) from None
    apply_private_umask()  # patient data: files 0600, folders 0700 (node.filemodes)
    configure_logging(settings.log_level)
    raise typer.Exit(run_worker(settings, delivery=delivery))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("worker")(command)

if __name__ == "__main__":
    app()
