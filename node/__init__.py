"""llm-cxr-node: the service (settings, database, spool, assembly, queue, worker, API, CLI).

``node`` uses ``integration`` and ``models``; neither of those imports ``node``.
"""

__version__ = "0.1.0"
