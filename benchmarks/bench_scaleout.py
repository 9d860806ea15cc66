"""Jobs per minute with 1, 2 and 3 worker processes sharing one remote engine (#29).

Not a test. One ``cxr-node engine`` serves the bundle's GGUF; for each worker count N, a
fresh PostgreSQL schema gets ``--studies`` chest studies through the node's own ingest
(the real RG1 CR, shifted sideways per study so that every prompt has its own image codes
and the engine cannot reuse a previous prompt's cache); N ``cxr-node worker`` processes
(``backend = "remote"``) are started and, once every one has its model ready, the studies
are completed at once (the clock starts) and the run ends when every job is ``done`` (the
clock stops). Printed: jobs/min per N and its ratio to N = 1 from the same run, and that
each job was drafted exactly once.

Usage::

    python benchmarks/bench_scaleout.py                       # demo bundle, 24 studies
    python benchmarks/bench_scaleout.py --studies 12 --workers 1,2 --max-new-tokens 16
    python benchmarks/bench_scaleout.py --bundle DIR --quant q8_0 --engine-threads 8

PostgreSQL: ``--pg`` (default ``$CXR_NODE_TEST_PG_URL`` or the local ``test`` database).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from integration.scp import ReceivedMeta  # noqa: E402
from node.db import study_completion as completion_db  # noqa: E402
from node.db.engine import make_engine, make_session_factory  # noqa: E402
from node.db.migrate import upgrade  # noqa: E402
from node.db.models import Draft, Job, JobState, utcnow  # noqa: E402
from node.runtime.ingest import IngestSink  # noqa: E402
from node.settings import load_settings  # noqa: E402

PG_URL = os.environ.get("CXR_NODE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_engine(bundle: Path, quant: str, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    """``cxr-node engine`` on the bundle; returns once ``/v1/models`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "node.cli", "engine", str(bundle), "--port", str(port)]
    cmd += ["--quant", quant, "--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cxr-node engine exited {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("cxr-node engine did not answer in 120 s")


def new_schema() -> tuple[str, str]:
    """A fresh, empty PostgreSQL schema: (its name, a URL whose search_path is it)."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    return schema, f"{PG_URL}?options=-csearch_path%3D{schema}"


def drop_schema(schema: str) -> None:
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def ingest_studies(sink: IngestSink, template: Path, work: Path, n: int) -> None:
    """``n`` one-image chest studies through the node's ingest, each shifted sideways."""
    base = dcmread(template)
    pixels = base.pixel_array
    for i in range(n):
        ds = dcmread(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ViewPosition = "PA"
        ds.PixelData = np.roll(pixels, 7 * (i + 1), axis=1).astype(pixels.dtype).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = work / f"in-{i}.dcm"
        path.write_bytes(buf.getvalue())
        meta = ReceivedMeta(
            calling_ae="BENCH",
            peer_address="127.0.0.1",
            peer_port=104,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            called_ae="LLMCXR",
        )
        result = sink.accept(path, meta)
        if result.status != 0x0000:
            raise SystemExit(f"ingest refused study {i}: 0x{int(result.status):04X}")


def start_workers(n: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        with open(logs / f"worker-{i}.log", "wb") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "node.cli.worker"],
                    cwd=REPO,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + 180
    for i, p in enumerate(procs):
        log = logs / f"worker-{i}.log"
        while "ready" not in log.read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker {i} did not get ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
    return procs


def run(n_workers: int, args: argparse.Namespace, bundle: Path, engine_url: str) -> float:
    """One measurement: jobs/min with ``n_workers`` workers."""
    schema, url = new_schema()
    work = Path(tempfile.mkdtemp(prefix=f"scaleout-{n_workers}-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upgrade(url)
        settings = load_settings(
            database_url=url, spool_dir=work / "spool", min_free_disk_mb=0, api_enabled=False
        )
        settings.prepare_runtime()
        engine = make_engine(url)
        sf = make_session_factory(engine)
        sink = IngestSink(settings=settings, session_factory=sf)
        ingest_studies(sink, args.image, work, args.studies)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE_")}
        env.update(
            {
                "CXR_NODE_DATABASE_URL": url,
                "CXR_NODE_SPOOL_DIR": str(work / "spool"),
                "CXR_NODE_MODEL_DIR": str(bundle),
                "CXR_NODE_BACKEND": "remote",
                "CXR_NODE_REMOTE_URLS": engine_url,
                "CXR_NODE_GENERATION_MAX_NEW_TOKENS": str(args.max_new_tokens),
                "CXR_NODE_MIN_FREE_DISK_MB": "0",
                "CXR_NODE_API_ENABLED": "false",
                "CXR_NODE_LOG_LEVEL": "INFO",
            }
        )
        procs = start_workers(n_workers, env, work)
        t0 = time.perf_counter()
        with sf() as s:
            done = completion_db.complete_quiet_studies(
                s,
                quiet_seconds=1.0,
                max_wait_seconds=600.0,
                now=utcnow() + timedelta(seconds=5),
                rule=settings.chest_rule,
            )
        jobs = [r.job_id for r in done if r.job_id is not None]
        if len(jobs) != args.studies:
            raise SystemExit(f"{len(jobs)} jobs queued for {args.studies} studies")
        while True:
            with sf() as s:
                n_done = s.scalar(select(func.count(Job.id)).where(Job.state == JobState.done))
            if n_done == len(jobs):
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a worker exited during the run")
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        with sf() as s:
            drafts = s.scalar(select(func.count(Draft.id)))
        if drafts != len(jobs):
            raise SystemExit(f"{drafts} drafts for {len(jobs)} jobs: a job was drafted twice")
        engine.dispose()
        return len(jobs) / elapsed * 60.0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        drop_schema(schema)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--workers", default="1,2,3", help="worker counts, comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--bundle", type=Path, default=None, help="default: a fresh demo bundle")
    ap.add_argument("--quant", default="f16", help="the engine's converted file")
    ap.add_argument("--engine-threads", type=int, default=1)
    ap.add_argument("--image", type=Path, default=None, help="default: pydicom-data RG1_UNCR")
    args = ap.parse_args()
    if args.image is None:
        from pydicom.data import get_testdata_file

        args.image = Path(str(get_testdata_file("RG1_UNCR.dcm")))
    tmp = Path(tempfile.mkdtemp(prefix="scaleout-"))
    try:
        bundle = args.bundle
        if bundle is None:
            from models.demo import create_demo_bundle
            from models.gguf_convert import convert_bundle

            bundle = tmp / "bundle"
            create_demo_bundle(bundle)
            convert_bundle(bundle, quant=args.quant, threads=1)
        engine, url = start_engine(bundle, args.quant, args.engine_threads)
        try:
            counts = [int(x) for x in args.workers.split(",")]
            rates = {n: run(n, args, bundle, url) for n in counts}
        finally:
            engine.terminate()
            engine.wait(timeout=30)
        ref = rates[counts[0]]
        print(f"{args.studies} studies, {args.max_new_tokens} new tokens, one engine")
        print("| workers | jobs/min | ratio to 1 worker |")
        print("|---|---|---|")
        for n in counts:
            print(f"| {n} | {rates[n]:.1f} | {rates[n] / ref:.2f}x |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
