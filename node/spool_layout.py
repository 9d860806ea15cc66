"""Where things lie in the spool, for every role (ingest, worker, retention, the console).

Received instances: ``<Study UID>/<Series UID>/<SOP Instance UID>.dcm``
(:mod:`node.runtime.spool`). The worker's output objects: ``outputs/`` (:data:`OUTPUTS_DIR`),
the draft SR as ``outputs/<SR SOP Instance UID>.dcm`` (:func:`draft_sr_path`).
"""

from __future__ import annotations

__all__ = ["OUTPUTS_DIR", "draft_sr_path"]

OUTPUTS_DIR = "outputs"
"""The folder, under the spool root, of the objects the worker writes."""


def draft_sr_path(sr_uid: str) -> str:
    """The draft SR's file, relative to the spool root."""
    return f"{OUTPUTS_DIR}/{sr_uid}.dcm"
