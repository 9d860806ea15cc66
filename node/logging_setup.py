"""Logging for the node: one plain line per record on stderr (journald adds timestamps too).

Log AE titles, addresses and UIDs only; never patient names, IDs, birth dates or report text.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG_FORMAT", "configure_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "cxr-node"


def configure_logging(level: str | int = "INFO", *, stream: object = None) -> None:
    """Configure the root logger once (idempotent: a second call only changes the level).

    Parameters
    ----------
    level
        ``DEBUG`` ... ``CRITICAL`` or a number.
    stream
        Where to write; ``sys.stderr`` by default.
    """
    root = logging.getLogger()
    root.setLevel(level if isinstance(level, int) else level.upper())
    if not any(getattr(h, "name", None) == _HANDLER_NAME for h in root.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
        handler.name = _HANDLER_NAME
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    # pynetdicom logs every PDU at DEBUG and each association at INFO: keep it quieter
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    )
    # "skipped: maximum number of running instances" is expected when a chore is slow
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
