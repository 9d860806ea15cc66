"""The model of this process, for requests made by a person (the API, the console).

:func:`interactive_model` borrows the model host's runtime as an interactive request: it
goes ahead of waiting worker batches without starving them
(:class:`node.runtime.model_lock.FairModelLock`, ``docs/policies.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from node.services.context import ServiceContext
from node.services.errors import Unavailable

if TYPE_CHECKING:
    from models.runtime import LLMCXR

__all__ = ["MODEL_WAIT_SECONDS", "interactive_model", "require_model"]

#: how long a request waits for the model before it is answered 503
MODEL_WAIT_SECONDS = 120.0
_NO_MODEL = "no model in this process: set model_dir and run the model host"


def require_model(ctx: ServiceContext) -> None:
    """Fail early when this process has no model or it is not ready.

    Raises
    ------
    node.services.errors.Unavailable
        No model host in this process (503).
    node.runtime.modelhost.ModelNotReady
        While the model loads, or after it failed to (503).
    """
    host = ctx.host()
    if host is None:
        raise Unavailable(_NO_MODEL)
    host.runtime  # noqa: B018 (raises ModelNotReady while loading or after a failure)


@contextmanager
def interactive_model(ctx: ServiceContext) -> Iterator[LLMCXR]:
    """The runtime, held for one interactive request (at most :data:`MODEL_WAIT_SECONDS`
    waiting for it).

    Raises
    ------
    node.services.errors.Unavailable
        No model host in this process (503).
    """
    host = ctx.host()
    if host is None:
        raise Unavailable(_NO_MODEL)
    with host.use(timeout=MODEL_WAIT_SECONDS, interactive=True) as runtime:
        yield runtime
