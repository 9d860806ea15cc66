"""What the ``cxr-node`` commands share: the root ``--config`` option and settings loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from node.settings import ConfigError, Settings, load_settings

__all__ = ["err", "load", "options"]

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
