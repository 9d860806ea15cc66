"""The components ``cxr-node serve`` runs beside the storage SCP, in start order.

Each entry is a factory called with the node's :class:`~node.service.NodeContext`; the
model host comes first so that the worker and the API find it in ``ctx.extras``.
"""

from __future__ import annotations

from node.service import ComponentOrFactory
from node.settings import Settings


def default_components(
    settings: Settings, *, worker: bool = True, api: bool | None = None
) -> list[ComponentOrFactory]:
    """Return the component factories for ``serve`` under ``settings``.

    Parameters
    ----------
    settings
        The node's settings: no model directory means no model host and no worker (the node
        then only receives and queues); ``api_enabled`` turns the admin API on.
    worker
        Run the job worker in this process (``serve --no-worker`` for an ingest-only node).
    api
        Override ``settings.api_enabled``.
    """
    from node.delivery import make_delivery

    items: list[ComponentOrFactory] = []
    if settings.model_dir is not None:
        from node.modelhost import make_model_host

        items.append(make_model_host)
        if worker:
            from node.worker import make_worker

            items.append(make_worker)
    items.append(make_delivery)
    if settings.api_enabled if api is None else api:
        from node.api.server import make_api_server

        items.append(make_api_server)
    return items
