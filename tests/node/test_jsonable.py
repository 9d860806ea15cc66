"""``node.jsonable.to_jsonable``: one JSON form for the CLI's and API's records."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from node.jsonable import to_jsonable


@dataclass(frozen=True)
class _Inner:
    at: datetime
    tags: tuple[str, ...]


@dataclass(frozen=True)
class _Outer:
    day: date
    where: Path
    inner: list[_Inner]
    extra: dict[int, datetime | None] = field(default_factory=dict)


def test_dataclasses_times_tuples_and_other_values() -> None:
    at = datetime(2026, 12, 6, 21, 30, 5, 123000, tzinfo=UTC)
    value = _Outer(
        day=date(2026, 12, 6),
        where=Path("/spool/outputs"),
        inner=[_Inner(at=at, tags=("a", "b"))],
        extra={3: at, 4: None},
    )
    out = to_jsonable(value)
    assert out == {
        "day": "2026-12-06",
        "where": "/spool/outputs",
        "inner": [{"at": "2026-12-06T21:30:05.123000+00:00", "tags": ["a", "b"]}],
        "extra": {"3": "2026-12-06T21:30:05.123000+00:00", "4": None},
    }
    assert datetime.fromisoformat(out["inner"][0]["at"]) == at
    # a list of records, and plain values, take the same rule
    assert to_jsonable([value.inner[0], 1, "x", None]) == [out["inner"][0], 1, "x", None]
    assert json.loads(json.dumps(out)) == out
