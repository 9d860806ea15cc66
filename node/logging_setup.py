"""Logging for the node: one plain line per record on stderr (journald adds timestamps too).

Log AE titles, addresses and UIDs only; never patient names, IDs, birth dates or report text.
The node's own messages follow that rule; libraries do not know it, so the node's handler
carries a guard (:class:`PatientDataFilter`, :class:`PrivateFormatter`) and
:func:`configure_logging` routes Python warnings through it:

- **Python warnings** (``warnings.warn`` from any library) become one line naming the
  category and the source line, without the text: highdicom quotes a single-component
  Patient Name ("DOE JOHN"), pydicom an invalid value (``Invalid value for VR DA:
  '1951-03-14'``). Warnings whose category the node defines keep their text.
- **Libraries that quote values in their log records**: every record of ``pydicom`` (element
  values in its warnings, whole data sets in its debug output), ``highdicom`` at WARNING and
  above (the person names it finds suspicious), and ``sqlalchemy.engine`` at DEBUG (result
  rows: draft report text) keep their level, logger and source line; the text is withheld.
  Bound SQL parameters are hidden by the engine itself (``hide_parameters``,
  :func:`node.db.engine.make_engine`).
- **Tracebacks**: the message of an exception raised outside the node's packages (``node``,
  ``integration``, ``models``) is withheld (``Unable to convert '1951-03-14' to 'DA'
  object``); the stack (files, lines, code) is kept (:func:`format_exception_privately`).

What stays: everything the node itself logs, pynetdicom's association and DIMSE records (AE
titles, addresses, UIDs, statuses), and every other library's records.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from types import TracebackType
from typing import TextIO

__all__ = [
    "LOG_FORMAT",
    "OWN_PACKAGES",
    "WITHHELD",
    "PatientDataFilter",
    "PrivateFormatter",
    "configure_logging",
    "format_exception_privately",
    "show_warning",
]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "cxr-node"
#: The node's own packages: their messages and exceptions are written as they are.
OWN_PACKAGES = ("node", "integration", "models")
WITHHELD = "text withheld: it may quote patient attributes"
_SAFE = "cxr_node_safe"  # set on records this module composed without library text
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = tuple(os.path.join(_SOURCE_ROOT, p) + os.sep for p in OWN_PACKAGES)
# (logger name or prefix, lowest level withheld, highest level withheld)
_GUARDED: tuple[tuple[str, int, int], ...] = (
    ("pydicom", logging.NOTSET, logging.CRITICAL),
    ("highdicom", logging.WARNING, logging.CRITICAL),
    ("sqlalchemy.engine", logging.NOTSET, logging.DEBUG),
    ("py.warnings", logging.NOTSET, logging.CRITICAL),  # logging.captureWarnings() records
)


def _short_path(path: str) -> str:
    """``path`` from its package on (``highdicom/base.py``), never a user's home prefix."""
    parts = os.path.normpath(path).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1 :])
    if path.startswith(_SOURCE_ROOT + os.sep):
        return os.path.relpath(path, _SOURCE_ROOT).replace(os.sep, "/")
    return os.path.basename(path)


def _is_own_module(module: str) -> bool:
    return module.split(".", 1)[0] in OWN_PACKAGES


def _is_own_file(path: str) -> bool:
    return os.path.abspath(path).startswith(_OWN_DIRS)


def _guarded(name: str, level: int) -> bool:
    for prefix, low, high in _GUARDED:
        if (name == prefix or name.startswith(prefix + ".")) and low <= level <= high:
            return True
    return False


class PatientDataFilter(logging.Filter):
    """Withhold the text of library records that may quote patient attribute values.

    A record of a guarded logger (see the module docstring) keeps its level, logger name
    and source line; its message becomes ``<file>:<line>: text withheld: ...`` and its
    arguments are dropped. Every record passes (the filter never drops one); records of the
    node's own loggers are not touched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place when its logger is guarded; always ``True``."""
        if getattr(record, _SAFE, False) or not _guarded(record.name, record.levelno):
            return True
        record.msg = f"{_short_path(record.pathname)}:{record.lineno}: {WITHHELD}"
        record.args = None
        setattr(record, _SAFE, True)
        return True


def _raised_in_own_code(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return _is_own_module(type(exc).__module__)
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _is_own_file(tb.tb_frame.f_code.co_filename)


def _exception_line(exc: BaseException) -> str:
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    if not _raised_in_own_code(exc):
        return f"{name}: ({WITHHELD})\n"
    text = str(exc)
    return f"{name}: {text}\n" if text else f"{name}\n"


def format_exception_privately(exc: BaseException) -> str:
    """A traceback like :func:`traceback.format_exception`, with library messages withheld.

    Parameters
    ----------
    exc
        The exception (its ``__cause__`` / ``__context__`` chain is included).

    Returns
    -------
    str
        The stack of each exception in the chain (files, lines, source code), and each
        exception's type; its message only when it was raised in the node's own packages.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__
    ordered = chain[::-1]  # the first exception raised first, as Python prints them
    parts: list[str] = []
    for i, item in enumerate(ordered):
        if i:
            parts.append(
                "\nThe above exception was the direct cause of the following exception:\n\n"
                if item.__cause__ is ordered[i - 1]
                else "\nDuring handling of the above exception, another exception occurred:\n\n"
            )
        if item.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(item.__traceback__))
        parts.append(_exception_line(item))
    return "".join(parts).rstrip("\n")


class PrivateFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose tracebacks withhold library exception messages."""

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record``; a traceback another handler cached is formatted again."""
        if record.exc_info:
            record.exc_text = None  # later handlers reuse this formatter's private text
        return super().format(record)

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        """Format ``ei`` with :func:`format_exception_privately`."""
        if ei[1] is None:
            return super().formatException(ei)
        return format_exception_privately(ei[1])


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """:data:`warnings.showwarning` for the node: log the warning on ``py.warnings``.

    The line names the category and where it was raised; the warning's text only when its
    category is defined in the node's own packages. ``file`` and ``line`` are ignored.
    """
    where = f"{_short_path(filename)}:{lineno}"
    if _is_own_module(category.__module__):
        text = f"{category.__name__} at {where}: {message}"
    else:
        text = f"{category.__name__} at {where} ({WITHHELD})"
    logging.getLogger("py.warnings").warning("%s", text, extra={_SAFE: True})


def configure_logging(level: str | int = "INFO", *, stream: TextIO | None = None) -> None:
    """Configure the root logger once (idempotent: a second call only changes the level).

    Installs the node's handler (stderr, :data:`LOG_FORMAT`, :class:`PatientDataFilter`,
    :class:`PrivateFormatter`) on the root logger and :func:`show_warning` as
    :data:`warnings.showwarning`, so library warnings reach the log without their text.

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
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.name = _HANDLER_NAME
        handler.setFormatter(PrivateFormatter(LOG_FORMAT))
        handler.addFilter(PatientDataFilter())
        root.addHandler(handler)
    warnings.showwarning = show_warning
    # pynetdicom logs every PDU at DEBUG and each association at INFO: keep it quieter
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    )
    # "skipped: maximum number of running instances" is expected when a chore is slow
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
