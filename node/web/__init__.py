"""The node's web console: server-rendered pages over the admin API (``node.api``).

``router`` is included by :func:`node.api.app.create_app`; see :mod:`node.web.routes`.
"""

from node.web.routes import router

__all__ = ["router"]
