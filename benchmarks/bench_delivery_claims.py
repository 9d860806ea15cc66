"""What the delivery claim's wait for cancelled sends costs, on a backlog.

Not a test. The studies and done jobs of ``bench_console_queries.seed`` (``--jobs``) get
``--per-job`` delivery rows each, one per destination: one job in 50 has them ``pending``
and due (the backlog a sender claims from), the others ``sent``. The first ``--under-way``
jobs of the backlog have the row to their first destination ``cancelled`` with a claim's
end ahead (a send that may still be under way, :meth:`node.db.models.Delivery.cancel`),
and one more row there due, which must wait. The claim's select (the oldest 8 due rows of
done jobs, as :func:`node.db.delivery_claims.claim_due_deliveries` runs it, without the
lock) is timed with the condition that leaves the rows behind such a send, and without it,
the reference from the same run. Printed: both medians, their ratio, and the rows the wait
left out.

Usage::

    python benchmarks/bench_delivery_claims.py                     # SQLite, 20,000 jobs
    python benchmarks/bench_delivery_claims.py --under-way 40
    python benchmarks/bench_delivery_claims.py --database-url postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, true

from node.db.delivery_claims import _behind_a_cancelled_send, _due
from node.db.engine import make_engine, make_session_factory
from node.db.models import Delivery, DeliveryState, utcnow

sys.path.insert(0, str(Path(__file__).parent))
from bench_console_queries import seeded


def add_deliveries(url: str, jobs: int, per_job: int, under_way: int) -> None:
    """The delivery rows described above, after ``seed``'s one per job."""
    now = utcnow()
    backlog = range(50, jobs + 1, 50)
    held = set(backlog[:under_way])
    rows = []
    for job in range(1, jobs + 1):
        for d in range(per_job):
            due = job in backlog
            rows.append(
                {
                    "job_id": job,
                    "destination": f"DEST{d}@10.0.0.{d}:104",
                    "kind": "dimse",
                    "object": "pdf",
                    "state": DeliveryState.pending if due else DeliveryState.sent,
                    "attempts": 1,
                    "next_attempt_at": now if due else None,
                    "permanent_failure": False,
                    "created_at": now,
                }
            )
            if job in held and d == 0:  # its PDF was cancelled as it went; its SR waits
                rows[-1].update(
                    state=DeliveryState.cancelled, next_attempt_at=now + timedelta(minutes=2)
                )
                rows.append(
                    {
                        **rows[-1],
                        "object": "sr",
                        "state": DeliveryState.pending,
                        "next_attempt_at": now,
                    }
                )
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(Delivery), rows)
    engine.dispose()


def claim_select(condition: Any) -> Any:
    """The claim's select of the oldest 8 due rows, with ``condition``."""
    return select(Delivery.id).where(*_due(utcnow()), condition).order_by(Delivery.id).limit(8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--per-job", type=int, default=6)
    parser.add_argument("--under-way", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    with seeded(args.database_url, args.jobs) as url:
        add_deliveries(url, args.jobs, args.per_job, args.under_way)
        sessions = make_session_factory(make_engine(url), read_only=True)
        runs: dict[str, list[float]] = {"without": [], "with": []}
        chosen: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for name in runs:
                condition = true() if name == "without" else ~_behind_a_cancelled_send(utcnow())
                with sessions() as session:
                    t = time.perf_counter()
                    chosen[name] = list(session.scalars(claim_select(condition)))
                    runs[name].append(time.perf_counter() - t)
        ref, new = (statistics.median(runs[n]) for n in ("without", "with"))
        print(
            f"{args.jobs} jobs x {args.per_job} rows, {args.under_way} cancelled sends under way, "
            f"{url.split(':', 1)[0]}, median of {args.repeats}"
        )
        print(f"without the wait (reference) {ref * 1000:7.2f} ms")
        print(f"with the wait                {new * 1000:7.2f} ms  {new / ref:5.2f}x")
        left = sorted(set(chosen["without"]) - set(chosen["with"]))
        print(f"rows the wait left out of the 8 oldest due: {len(left)} {left}")


if __name__ == "__main__":
    main()
