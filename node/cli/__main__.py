"""``python -m node.cli``: the same as ``cxr-node``."""

from node.cli.main import main

main()
