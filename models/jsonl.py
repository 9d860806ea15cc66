"""JSON Lines input (dataset manifests, predictions, instruction data): one object a line.

:func:`json_lines` yields each non-blank line's parsed value with where it stands
(``path:line``), so that every reader names the line at fault in its own error type.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

__all__ = ["json_lines"]


def json_lines(
    data: bytes, name: object, error: type[ValueError]
) -> Iterator[tuple[str, int, Any]]:
    """``(where, line number, value)`` for each non-blank line of ``data`` (UTF-8).

    Parameters
    ----------
    data
        The file's bytes.
    name
        What to call the file in messages (its path).
    error
        The reader's error type, raised for text that is not UTF-8 or a line that is not
        JSON (``"<name>:<line>: not JSON (...)"``).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{name}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not JSON ({exc.msg})") from None
        yield where, number, value
