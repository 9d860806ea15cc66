"""``cxr-node deliveries failed|resend``: the console's Failures page from the shell.

Same services as ``GET /api/deliveries/failed`` and ``POST /api/deliveries/resend``; a
re-send is audited (``delivery.resend``) with the operating-system user as the actor.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.cli.admin import ID_MIN, actor, cli_services, fail
from node.db.models import ID_MAX
from node.services import deliveries as delivery_service
from node.services.errors import ServiceError

__all__ = ["app"]

app = typer.Typer(help="Failed deliveries: list them, re-send them.", no_args_is_help=True)


@app.command("failed")
def failed(
    destination: Annotated[
        str | None, typer.Option("--destination", help="Only this destination (its text).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON object on stdout.")] = False,
) -> None:
    """Deliveries the node gave up on, newest attempt first, and the count per destination."""
    with cli_services() as ctx:
        rows, total = delivery_service.failures(ctx, destination=destination, limit=limit)
        summary = delivery_service.failures_by_destination(ctx)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "total": total,
                    "items": [r.to_dict() for r in rows],
                    "destinations": {s.destination: s.failed for s in summary},
                }
            )
        )
        return
    out = Console()
    for s in summary:
        out.print(f"{s.destination}: {s.failed} failed", markup=False, highlight=False)
    t = Table(title=f"failed deliveries ({len(rows)} of {total})")
    for col in ("id", "job", "destination", "object", "attempts", "last attempt", "error"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            str(r.id),
            str(r.job_id or ""),
            r.destination,
            r.object + (" (permanent)" if r.permanent else ""),
            str(r.attempts),
            r.last_attempt_at.isoformat(timespec="seconds") if r.last_attempt_at else "",
            (r.last_error or "")[:60],
        )
    out.print(t)


@app.command("resend")
def resend(
    ids: Annotated[
        list[int] | None, typer.Argument(help="Delivery ids.", min=ID_MIN, max=ID_MAX)
    ] = None,
    destination: Annotated[
        str | None,
        typer.Option("--destination", help="Every failed delivery of this destination."),
    ] = None,
) -> None:
    """Queue deliveries again: the given ids, or all failed ones of a destination."""
    if bool(ids) == (destination is not None):  # as POST /api/deliveries/resend: one of them
        raise typer.BadParameter(
            "give the delivery ids or --destination (one of them)", param_hint="IDS / --destination"
        )
    with cli_services() as ctx:
        try:
            queued = delivery_service.resend(
                ctx, actor=actor(), ids=ids or (), failed_to=destination
            )
        except ServiceError as exc:
            raise fail(exc) from None
    typer.echo(f"{len(queued)} deliveries queued again: {' '.join(map(str, queued)) or '-'}")
