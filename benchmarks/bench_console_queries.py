"""How the console's queue queries scale: search, filters and sorting over many jobs.

Not a test. A migrated SQLite database (or ``--database-url``) gets ``--jobs`` studies, each
with a job and a delivery (every tenth one failed), then each query of the queue page
(:func:`node.db.views.filter_jobs`: one page of 50 rows and the total) is timed. The
reference is the default page (newest first, no filter) in the same run; each query's
median is printed as a ratio to it, with its milliseconds.

Usage::

    python benchmarks/bench_console_queries.py                 # 20,000 jobs on SQLite
    python benchmarks/bench_console_queries.py --jobs 2000     # quicker
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade
from node.db.models import Delivery, Job, Study
from node.db.views import JobFilter, filter_jobs

FAMILIES = ("DOE", "ROE", "SMITH", "MÜLLER", "GARCIA", "NGUYEN", "KOWALSKI", "TANAKA")
GIVEN = ("JANE", "JOHN", "ALEX", "MARIA", "WEI", "OLGA", "SAM", "LEA")


def seed(url: str, n: int) -> None:
    """``n`` studies, each with a done job and one delivery (every tenth failed)."""
    engine = make_engine(url)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(Study),
            [
                {
                    "id": i + 1,
                    "study_instance_uid": f"2.25.{10**12 + i}",
                    "state": "complete",
                    "patient_name": f"{FAMILIES[i % 8]}^{GIVEN[(i // 8) % 8]}^{i}",
                    "patient_id": f"MRN{i:07d}",
                    "accession_number": f"ACC{i:08d}",
                    "study_date": (t0 + timedelta(hours=i)).strftime("%Y%m%d"),
                    "study_description": "CHEST PA" if i % 3 else "THORAX AP",
                    "modalities": "CR" if i % 2 else "DX",
                    "calling_ae": f"PACS{i % 4}",
                    "instance_count": 1,
                    "series_count": 1,
                    "first_received_at": t0 + timedelta(minutes=i),
                    "last_received_at": t0 + timedelta(minutes=i),
                    "receiving_since": t0 + timedelta(minutes=i),
                    "forced_completion": False,
                }
                for i in range(n)
            ],
        )
        conn.execute(
            insert(Job),
            [
                {
                    "id": i + 1,
                    "study_id": i + 1,
                    "state": "done",
                    "priority": i % 5,
                    "attempts": 1,
                    "max_attempts": 3,
                    "created_at": t0 + timedelta(minutes=i),
                    "updated_at": t0 + timedelta(minutes=i, seconds=30),
                }
                for i in range(n)
            ],
        )
        conn.execute(
            insert(Delivery),
            [
                {
                    "job_id": i + 1,
                    "destination": "PACS@10.0.0.1:104",
                    "kind": "dimse",
                    "object": "sr",
                    "state": "failed" if i % 10 == 0 else "sent",
                    "attempts": 1,
                    "permanent_failure": False,
                    "created_at": t0 + timedelta(minutes=i),
                }
                for i in range(n)
            ],
        )
    engine.dispose()


@contextmanager
def seeded(database_url: str | None, jobs: int) -> Iterator[str]:
    """The URL of ``database_url``, or of a SQLite file in a temporary folder (removed
    after), migrated and :func:`seed`-ed with ``jobs`` studies."""
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"
        upgrade(url)
        seed(url, jobs)
        yield url


def timed(url: str, flt: JobFilter, repeats: int) -> tuple[float, int]:
    """Median seconds of one page query, and the total it reports."""
    sessions = make_session_factory(make_engine(url), read_only=True)
    runs: list[float] = []
    total = 0
    for _ in range(repeats):
        with sessions() as session:
            t = time.perf_counter()
            _rows, total = filter_jobs(session, flt)
            runs.append(time.perf_counter() - t)
    return statistics.median(runs), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    with seeded(args.database_url, args.jobs) as url:
        queries = {
            "default page (reference)": JobFilter(limit=50),
            "search 'doe jane' (name words)": JobFilter(text="doe jane", limit=50),
            "search accession in part": JobFilter(text="ACC000123", limit=50),
            "patient ID": JobFilter(patient="MRN0012345", limit=50),
            "delivery failed": JobFilter(delivery="failed", limit=50),
            "study date range + modality": JobFilter(
                study_date_from="20260201", study_date_to="20260301", modality="DX", limit=50
            ),
            "sort by patient name, page 100": JobFilter(
                sort="patient_name", descending=False, limit=50, offset=4950
            ),
        }
        print(f"{args.jobs} jobs, {url.split(':', 1)[0]}, median of {args.repeats}")
        print(f"{'query':40} {'ms':>8} {'x ref':>7} {'total':>7}")
        ref: float | None = None
        for name, flt in queries.items():
            median, total = timed(url, flt, args.repeats)
            ref = ref or median  # the first query is the reference
            print(f"{name:40} {median * 1000:8.1f} {median / ref:7.2f} {total:7d}")


if __name__ == "__main__":
    main()
