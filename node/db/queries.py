"""Query shapes the repository shares: a page of rows with the number of all matches, the
page bounds every listing accepts, counts by state with every state present, the
case-insensitive "contains" match of the search fields, and delivery rows locked for an
update or cancelled.

Each helper runs in the caller's session and transaction (no commit).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, TypeVarTuple

from sqlalchemy import ColumnElement, Result, Select, func, select
from sqlalchemy.orm import Session

from node.db.models import Delivery, DeliveryObject

__all__ = [
    "MAX_PAGE",
    "cancel_unsent",
    "check_page",
    "contains",
    "count_by_state",
    "locked_deliveries",
    "page",
]

_Ts = TypeVarTuple("_Ts")

MAX_PAGE = 1000
"""The most rows one page of a listing may ask for."""


def check_page(limit: int, offset: int) -> None:
    """Check a listing's page bounds.

    Parameters
    ----------
    limit
        Rows on the page, 1 to :data:`MAX_PAGE`.
    offset
        Rows skipped before the page, at least 0.

    Raises
    ------
    ValueError
        ``limit`` or ``offset`` is out of bounds.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_PAGE}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")


def page(
    session: Session,
    stmt: Select[*_Ts],
    *,
    order_by: Sequence[Any],
    limit: int,
    offset: int,
) -> tuple[Result[*_Ts], int]:
    """One page of ``stmt``'s rows and the number of rows ``stmt`` selects in all.

    Parameters
    ----------
    session
        A (read) session.
    stmt
        The filtered query, not yet ordered or paged.
    order_by
        The page's order (end it with a unique column so that pages do not overlap).
    limit, offset
        The page: at most ``limit`` rows after the first ``offset``.

    Returns
    -------
    tuple
        The page's result (rows of ``stmt``'s columns; ``.scalars()`` for one entity) and
        the total number of matches.
    """
    total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
    rows = session.execute(stmt.order_by(*order_by).limit(limit).offset(offset))
    return rows, total


def count_by_state(
    session: Session, column: Any, states: type[enum.Enum], *where: Any
) -> dict[str, int]:
    """How many rows are in each state: ``{state value: count}``, every member of
    ``states`` present (zero included).

    Parameters
    ----------
    session
        A (read) session.
    column
        The state column (its values are members or values of ``states``).
    states
        The enum of the column's states.
    *where
        Conditions the counted rows must meet (none: every row).
    """
    out = {s.value: 0 for s in states}
    for state, n in session.execute(select(column, func.count()).where(*where).group_by(column)):
        out[states(state).value] = int(n)
    return out


def contains(column: Any, text: str) -> ColumnElement[bool]:
    """``column`` contains ``text``, case-insensitively (``%``, ``_`` and ``\\`` in
    ``text`` match themselves)."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return func.lower(column).like(f"%{escaped}%", escape="\\")


def locked_deliveries(session: Session, *where: Any, skip_locked: bool = False) -> list[Delivery]:
    """Delivery rows matching ``where``, by id, locked for update and freshly loaded."""
    return list(
        session.scalars(
            select(Delivery)
            .where(*where)
            .order_by(Delivery.id)
            .with_for_update(skip_locked=skip_locked)
            .execution_options(populate_existing=True)
        )
    )


def cancel_unsent(session: Session, *where: Any, why: str) -> list[Delivery]:
    """Cancel the object rows matching ``where`` not sent yet (``pending``, one being sent
    included, or ``failed``; never a ``withdrawal``), locked, with ``why`` as their error
    (:meth:`Delivery.cancel`): no retry, re-queue or re-send sends them. The rows, by id."""
    rows = locked_deliveries(
        session,
        *where,
        Delivery.object != DeliveryObject.withdrawal,
        Delivery.unsent,
    )
    for row in rows:
        row.cancel(why)
    return rows
