"""The node's admin HTTP API (FastAPI): jobs, tokens, audit, model tasks, health, metrics.

:func:`node.api.app.create_app` builds the application; :func:`node.api.server.make_api_server`
runs it with uvicorn inside ``cxr-node serve``. Authentication and roles: :mod:`node.api.auth`.
"""
