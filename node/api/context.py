"""What the API's routes need from the node: settings, sessions, the model host."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from node.settings import Settings

if TYPE_CHECKING:
    from node.runtime.modelhost import ModelHost

__all__ = ["ApiContext", "api_context"]


@dataclass(frozen=True)
class ApiContext:
    """The API's view of the node.

    Parameters
    ----------
    settings
        The node's settings.
    read_sessions
        Read-only session factory (``make_session_factory(engine, read_only=True)``): every
        GET goes through it, so reads never take SQLite's write lock.
    write_sessions
        Write session factory, for admin actions (repository functions commit).
    model_host
        Returns the model host (``ctx.extras["model_host"]``) or ``None`` when this process
        runs no model; called per request because the host may be added after start-up.
    """

    settings: Settings
    read_sessions: sessionmaker[Session]
    write_sessions: sessionmaker[Session]
    model_host: Callable[[], ModelHost | None] | None = None

    def host(self) -> ModelHost | None:
        """The model host, or ``None``."""
        return self.model_host() if self.model_host is not None else None

    @classmethod
    def from_node(cls, ctx: Any) -> ApiContext:
        """Build from a :class:`node.runtime.service.NodeContext`."""
        from node.db.engine import make_session_factory

        extras: dict[str, Any] = ctx.extras
        return cls(
            settings=ctx.settings,
            read_sessions=make_session_factory(ctx.engine, read_only=True),
            write_sessions=ctx.session_factory,
            model_host=lambda: extras.get("model_host"),
        )


def api_context(request: Request) -> ApiContext:
    """FastAPI dependency: the :class:`ApiContext` of the running app."""
    ctx = request.app.state.api
    assert isinstance(ctx, ApiContext)
    return ctx
