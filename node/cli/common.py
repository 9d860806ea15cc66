"""What the ``cxr-node`` commands share: the root ``--config`` option, settings loading, and
the services' context on the configured database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from node.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from node.services.context import ServiceContext

__all__ = ["db_unreachable", "err", "load", "options", "services"]

#: the root options, set by ``cxr-node``'s callback before a command runs
options: dict[str, Path | None] = {"config": None}
err = Console(stderr=True)


def load(config: Path | None = None, **overrides: Any) -> Settings:
    """The settings from ``config`` (default: the root ``--config``), the environment and
    ``overrides``; a refused configuration exits with status 2 and the reason."""
    try:
        return load_settings(config if config is not None else options["config"], **overrides)
    except ConfigError as exc:
        err.print(f"[red]configuration refused:[/red] {exc}", highlight=False, markup=True)
        raise typer.Exit(2) from None


def db_unreachable(settings: Settings, exc: Exception) -> typer.Exit:
    """Print that the database does not answer (its URL without the password, the driver's
    first line); exit status 1."""
    url = settings.public_database_url
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    err.print(
        f"database {url} does not answer: {reason[0] if reason else type(exc).__name__}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return typer.Exit(1)


@contextmanager
def services(settings: Settings, *, table: str = "jobs") -> Iterator[ServiceContext]:
    """The services' context on ``settings.database_url`` (no model host: the CLI runs the
    model in-process where a command needs it); exits with status 1 and a hint when the
    schema lacks ``table`` (not migrated yet), or with status 1 and one line when the database
    does not answer."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import InterfaceError, OperationalError

    from node.db.engine import make_engine, make_session_factory
    from node.services.context import ServiceContext

    engine = make_engine(settings.database_url)
    try:
        try:
            migrated = inspect(engine).has_table(table)
        except (InterfaceError, OperationalError) as exc:
            raise db_unreachable(settings, exc) from None
        if not migrated:
            err.print(
                "database has no current node schema: run `cxr-node db upgrade` "
                "(or `cxr-node serve`)"
            )
            raise typer.Exit(1)
        yield ServiceContext(
            settings=settings,
            read_sessions=make_session_factory(engine, read_only=True),
            write_sessions=make_session_factory(engine),
        )
    finally:
        engine.dispose()
