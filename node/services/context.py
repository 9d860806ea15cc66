"""What a use case needs from the node: settings, database sessions, the model host."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from node.settings import Settings

if TYPE_CHECKING:
    from node.runtime.modelhost import ModelHost

__all__ = ["ServiceContext"]


@dataclass(frozen=True)
class ServiceContext:
    """The node as the services see it (API, web console and CLI alike).

    Parameters
    ----------
    settings
        The node's settings.
    read_sessions
        Read-only session factory (``make_session_factory(engine, read_only=True)``): reads
        go through it, so they never take SQLite's write lock.
    write_sessions
        Write session factory, for actions (repository functions commit).
    model_host
        Returns the model host (``ctx.extras["model_host"]``) or ``None`` when this process
        runs no model; called per use because the host may be added after start-up.
    """

    settings: Settings
    read_sessions: sessionmaker[Session]
    write_sessions: sessionmaker[Session]
    model_host: Callable[[], ModelHost | None] | None = None

    def host(self) -> ModelHost | None:
        """The model host, or ``None``."""
        return self.model_host() if self.model_host is not None else None

    @classmethod
    def from_node(cls, ctx: Any) -> ServiceContext:
        """Build from a :class:`node.runtime.service.NodeContext`."""
        from node.db.engine import make_session_factory

        extras: dict[str, Any] = ctx.extras
        return cls(
            settings=ctx.settings,
            read_sessions=make_session_factory(ctx.engine, read_only=True),
            write_sessions=ctx.session_factory,
            model_host=lambda: extras.get("model_host"),
        )
