"""JSON-ready forms of the node's records, for the CLI's ``--json`` output and the API's
hand-built answers.

One rule for every record: a dataclass becomes the dictionary of its fields, tuples become
lists, datetimes and dates are written in ISO 8601 extended format (RFC 3339 for
timezone-aware datetimes), and any other value JSON has no type for is written as its
``str``.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import date, datetime, time
from typing import Any

__all__ = ["to_jsonable"]


def _encode(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def to_jsonable(value: Any) -> Any:
    """The value as plain JSON types (dict, list, str, int, float, bool, ``None``).

    Parameters
    ----------
    value
        A dataclass instance (its fields, as :func:`dataclasses.asdict` gives them), or a
        dict, list, tuple or scalar, which may hold dataclass instances.

    Returns
    -------
    Any
        What ``json.loads(json.dumps(...))`` gives back, with datetimes, dates and times as
        ISO 8601 text and any other non-JSON value as its ``str``; dictionary keys are text.
    """
    return json.loads(json.dumps(value, default=_encode))
