"""``cxr-node``: the node's command line (typer + rich).

Commands: ``serve``, ``status [--json]``, ``db upgrade``, ``echo AET@host:port``,
``jobs list|show|retry|cancel|resend|priority``, ``tokens create|revoke|list``, ``ask``,
``generate-image`` (``node.cli.admin``), and ``models ...`` (model bundles). Configuration
comes from ``--config`` / ``CXR_NODE_CONFIG`` and ``CXR_NODE_*`` variables
(``docs/configuration.md``).
Exit codes: 0 success, 1 operation failed, 2 configuration refused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from node.cli.common import db_unreachable, err, load, options, services
from node.cli.models import app as models_app
from node.cli.worker import command as worker_command
from node.db import views as views_db
from node.db.migrate import current_revision, head_revision, upgrade
from node.db.models import JobState
from node.filemodes import apply_private_umask
from node.logging_setup import configure_logging
from node.services import jobs as job_service
from node.settings import ConfigError, Settings, parse_ae_address

__all__ = ["app", "main"]

app = typer.Typer(
    name="cxr-node",
    help="On-premises LLM-CXR inference node: DICOM in, draft SR out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database: create and migrate.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Jobs: list, show, retry, cancel, re-prioritise, re-send, withdraw.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.command("worker")(worker_command)


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML configuration file (default: $CXR_NODE_CONFIG).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    options["config"] = config


def _settings() -> Settings:
    return load()


@app.command()
def serve(
    worker: Annotated[
        bool,
        typer.Option(
            "--worker/--no-worker",
            help="Draft jobs in this process too (with model_dir); --no-worker for a receiver"
            " or API process beside separate `cxr-node worker` processes.",
        ),
    ] = True,
) -> None:
    """Run the node in the foreground (SCP, chores) until SIGTERM/SIGINT."""
    settings = _settings()
    apply_private_umask()  # patient data: files 0600, folders 0700 (node.filemodes)
    configure_logging(settings.log_level)
    from node.runtime.components import default_components
    from node.runtime.service import run_node

    try:
        code = run_node(settings, extra_components=default_components(settings, worker=worker))
    except ConfigError as exc:
        err.print(f"configuration refused: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    except (InterfaceError, OperationalError) as exc:
        raise db_unreachable(settings, exc) from None
    except OSError as exc:
        logging.getLogger("node").error("cannot serve: %s", exc)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database to the newest schema, then exit."""
    settings = _settings()
    configure_logging(settings.log_level)
    try:
        revision = upgrade(settings.database_url)
    except (InterfaceError, OperationalError) as exc:
        raise db_unreachable(settings, exc) from None
    typer.echo(f"database at revision {revision} (head {head_revision()})")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Counts of instances, studies, jobs and deliveries by state, and spool size."""
    settings = _settings()
    with services(settings) as ctx:  # one engine for the counts and the revision
        c = job_service.counts(ctx)
        with ctx.read_sessions() as session:
            bind = session.get_bind()
            revision = current_revision(bind if isinstance(bind, Engine) else bind.engine)
    data = c.to_dict()
    free = shutil.disk_usage(settings.spool_dir).free if settings.spool_dir.exists() else None
    data.update(
        {
            "spool_dir": str(settings.spool_dir),
            "spool_free_bytes": free,
            "database": settings.public_database_url,
            "schema_revision": revision,
            "ae_title": settings.ae_title,
        }
    )
    if as_json:
        typer.echo(json.dumps(data, sort_keys=True))
        return
    console = Console()
    head = Table(title=f"cxr-node {settings.ae_title}", show_header=False)
    head.add_row("database", str(data["database"]))
    head.add_row("schema revision", str(revision))
    head.add_row("instances", str(c.instances))
    head.add_row("series", str(c.series))
    head.add_row("spool", f"{c.spool_bytes / 1e6:.1f} MB in {settings.spool_dir}")
    if free is not None:
        head.add_row("spool free", f"{free / 1e9:.1f} GB")
    console.print(head)
    for title, mapping in (
        ("studies", c.studies_by_state),
        ("jobs", c.jobs),
        ("deliveries", c.deliveries),
    ):
        t = Table(title=title)
        t.add_column("state")
        t.add_column("count", justify="right")
        for k, v in mapping.items():
            t.add_row(k, str(v))
        console.print(t)


@app.command()
def echo(
    peer: Annotated[str, typer.Argument(help="The peer as AET@host:port.")],
    calling_ae: Annotated[
        str | None, typer.Option("--calling-ae", help="Calling AE title (default: ae_title).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Connection and ACSE timeout, seconds.")] = 10.0,
) -> None:
    """C-ECHO a DICOM peer (Verification SOP Class, PS3.4 Annex A); exit 1 on failure."""
    from integration.destinations import check_ae_title
    from integration.scu import DicomDestination
    from integration.scu import echo as c_echo

    try:
        parsed = parse_ae_address(peer)
    except ValueError as exc:
        err.print(f"echo: {exc}", markup=False)
        raise typer.Exit(2) from None
    if calling_ae is None:
        calling_ae = _settings().ae_title
    try:
        check_ae_title(calling_ae, label="--calling-ae")
    except ValueError as exc:
        err.print(f"echo: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    configure_logging("WARNING")
    dest = DicomDestination(ae_title=parsed.ae_title, host=parsed.host, port=parsed.port)
    ok = c_echo(
        dest,
        calling_ae,
        acse_timeout=timeout,
        dimse_timeout=timeout,
        network_timeout=timeout,
        connection_timeout=timeout,
    )
    if ok:
        typer.echo(f"C-ECHO {dest}: success (0x0000)")
        return
    err.print(f"C-ECHO {dest}: failed (no association or non-success status)", markup=False)
    raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list on stdout.")] = False,
    state: Annotated[
        JobState | None, typer.Option("--state", help="Only jobs in this state.")
    ] = None,
    search: Annotated[
        str | None,
        typer.Option(
            "--search",
            help="Words each found in the patient's name or ID, accession, study "
            "description or Study Instance UID (in part, any case).",
        ),
    ] = None,
    delivery: Annotated[
        str | None,
        typer.Option("--delivery", help="Delivery state: none, pending, sent or failed."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 100,
) -> None:
    """List jobs, newest first, with the study's identity and the delivery state."""
    settings = _settings()
    try:
        flt = views_db.JobFilter(
            states=[state] if state else [], text=search, delivery=delivery, limit=limit
        )
    except ValueError as exc:
        err.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    with services(settings) as ctx:
        rows, _ = job_service.list_jobs(ctx, flt)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows]))
        return
    t = Table(title=f"jobs ({len(rows)})")
    t.add_column("id", no_wrap=True)
    t.add_column("state", no_wrap=True, min_width=9)  # the longest state: "cancelled"
    t.add_column("delivery", no_wrap=True, min_width=7)
    for col in ("patient", "accession", "study UID", "attempts", "prio", "SR UID", "updated"):
        t.add_column(col)
    t.add_column("last error")
    for r in rows:
        t.add_row(
            str(r.id),
            r.state,
            r.delivery_state,
            " ".join(x for x in (r.patient_name, r.patient_id) if x),
            r.accession_number or "",
            r.study_uid,
            f"{r.attempts}/{r.max_attempts}",
            str(r.priority),
            r.sr_uid or "",
            r.updated_at.isoformat(timespec="seconds"),
            (r.last_error or "")[:60],
        )
    Console().print(t)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the demo keeps its bundle, database and spool.")
    ] = Path("var/demo"),
    image: Annotated[
        Path | None,
        typer.Option(
            help="Chest X-ray DICOM file to send (default: RG1 from pydicom-data).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the SR.")] = 900.0,
) -> None:
    """Main job on embedded defaults: receive a real CXR over DICOM, return a draft SR."""
    if image is not None:  # before the demo builds anything: a file it could not send
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        try:
            dcmread(image, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            err.print(
                f"--image: {image.name} is not a DICOM file the demo can send "
                f"({type(exc).__name__})",
                markup=False,
                highlight=False,
            )
            raise typer.Exit(2) from None
    apply_private_umask()  # the demo's database, spool and SR: 0600 files, 0700 folders
    configure_logging("WARNING")
    from node.demo import run_demo

    raise typer.Exit(run_demo(workdir=workdir, image=image, timeout=timeout))


# admin commands (jobs show/retry/cancel/resend/priority, tokens, ask, generate-image)
from node.cli.admin import register as _register_admin  # noqa: E402

_register_admin(app, jobs_app, _settings)

from node.cli.deliveries import app as _deliveries_app  # noqa: E402

app.add_typer(_deliveries_app, name="deliveries")

from node.cli.chat import chat as _chat_command  # noqa: E402

app.command("chat")(_chat_command)

from node.cli.train import app as _train_app  # noqa: E402

app.add_typer(_train_app, name="train")

from node.cli.engine import engine as _engine_command  # noqa: E402

app.command("engine")(_engine_command)

from node.cli.evaluate import evaluate as _evaluate_command  # noqa: E402

app.command("evaluate")(_evaluate_command)


def main() -> None:
    """Console-script entry point (``cxr-node``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
