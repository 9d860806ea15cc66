"""Read models from ORM rows: the dataclasses :mod:`node.db` hands to the services, built
field by field from the row's attributes of the same names.

One rule instead of a hand-written copy per record (``TurnRecord(id=t.id, at=t.at, ...)``):
a field takes the row's attribute of its name, an enum member as its value (the read models
carry plain strings), unless the caller gives the field's value.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, TypeVar

__all__ = ["read_model"]

T = TypeVar("T")


def read_model(cls: type[T], row: object, **values: Any) -> T:
    """Build the dataclass ``cls`` from ``row`` (an ORM object).

    Parameters
    ----------
    cls
        A dataclass of :mod:`node.db`'s read models.
    row
        The ORM row; every field of ``cls`` not in ``values`` must be one of its attributes.
    **values
        Fields computed by the caller (a derived flag, a joined row's column, a cast).

    Raises
    ------
    TypeError
        ``values`` names a field ``cls`` does not have.
    AttributeError
        A field is neither in ``values`` nor an attribute of ``row``.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name in names - set(values):
        value = getattr(row, name)
        kwargs[name] = value.value if isinstance(value, enum.Enum) else value
    return cls(**kwargs, **values)
