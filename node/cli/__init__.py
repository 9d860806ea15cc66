"""``cxr-node``, the node's command line: :mod:`node.cli.main` (the app and the node's
commands), :mod:`node.cli.admin` (jobs, tokens, the model's tasks), :mod:`node.cli.models`
(model bundles), :mod:`node.cli.worker` (a worker-only process)."""

from node.cli.main import app, main

__all__ = ["app", "main"]
