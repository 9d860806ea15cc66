"""``cxr-node worker``: run only the job worker (no storage SCP) until SIGTERM/SIGINT.

For multi-machine deployments (ingest on one host, GPU workers on others, one PostgreSQL
database and a shared spool) and for crash tests. It loads the configured model bundle once,
claims jobs from the configured database, writes SRs under ``<spool>/outputs`` and queues
their deliveries; the serve node's delivery component sends them (``--delivery`` sends from
here as well). Stale leases of dead workers are requeued by the worker itself.

The process itself is :func:`node.runtime.components.run_worker`; this is its command.
Standalone: ``python -m node.cli.worker [--config FILE]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from node.cli.common import err, load
from node.filemodes import apply_private_umask
from node.logging_setup import configure_logging
from node.runtime.components import run_worker

__all__ = ["app", "command"]


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
    overrides: dict[str, Any] = {}
    if concurrency is not None:
        overrides["worker_concurrency"] = concurrency
    if batch_size is not None:
        overrides["worker_batch_size"] = batch_size
    settings = load(config, **overrides)
    if settings.model_dir is None:
        err.print("configuration refused: model_dir: the worker needs a model bundle", markup=False)
        raise typer.Exit(2)
    apply_private_umask()  # patient data: files 0600, folders 0700 (node.filemodes)
    configure_logging(settings.log_level)
    raise typer.Exit(run_worker(settings, delivery=delivery))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("worker")(command)

if __name__ == "__main__":
    app()
