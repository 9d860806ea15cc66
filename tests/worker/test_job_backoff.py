"""Job retries back off; permanent errors fail at once (issue #22 item 9).

The defect: ENOSPC while writing the SR used all 3 attempts in 0.6 s, and a data set with an
unknown VR was retried 3 times. Here real studies go through the node's ingest, the real
worker (:class:`node.runtime.worker.Worker`, demo model) and a real full file system: a tiny tmpfs
mounted on the SR output folder (``<spool>/outputs``) and filled up, so ``write_sr`` really
gets ``OSError(ENOSPC)``; mounting needs root, and the test is skipped, saying so, where
it cannot mount.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from sqlalchemy.exc import OperationalError

from integration.errors import ConnectionFailedError, NoFrontalImageError, PixelDataError
from models.layout import TokenLayoutError
from models.results import InferenceError, ModelInputError
from node.db import jobs as jobs_db
from node.db.models import JobState, utcnow
from node.runtime.modelhost import ModelHost, ModelNotReady
from node.runtime.pipeline import is_permanent, run_batch
from node.runtime.spool import OUTPUTS_DIR
from node.runtime.stages import JobFailure
from node.runtime.worker import Worker
from tests.worker.conftest import NodeEnv, make_cxr, make_env

BACKOFF_S = 1.0


@pytest.fixture
def full_outputs(tmp_path: Path, demo_bundle: Path) -> Iterator[tuple[NodeEnv, Path]]:
    """A SQLite node env whose ``<spool>/outputs`` is a full 256 KiB tmpfs (and the filler)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root and mount(8)")
    env = make_env(
        f"sqlite:///{tmp_path / 'node.sqlite3'}",
        tmp_path,
        demo_bundle,
        job_max_attempts=3,
        job_backoff_seconds=BACKOFF_S,
        job_max_backoff_seconds=60.0,
    )
    outputs = env.settings.spool_dir / OUTPUTS_DIR
    outputs.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(outputs)], capture_output=True
    )
    if r.returncode != 0:
        env.engine.dispose()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    filler = outputs / "filler.bin"
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield env, filler
    finally:
        subprocess.run(["umount", "-l", str(outputs)], check=False)
        env.engine.dispose()


@pytest.mark.timeout(180)
def test_enospc_is_retried_with_backoff_and_succeeds_once_space_returns(
    full_outputs: tuple[NodeEnv, Path], model_host: ModelHost
) -> None:
    env, filler = full_outputs
    env.add_study(view="PA")
    [job_id] = env.queue_all()
    worker = Worker(env.context(), model_host, poll_interval=0.05)
    waits: list[float] = []  # from each failed attempt's requeue to the next claim (DB times)
    requeued_at = None
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = env.job(job_id)
            if job.state is JobState.queued and job.attempts >= 1:
                requeued_at = job.queued_at
                assert job.not_before is not None and job.not_before > job.queued_at
                if job.attempts == 2 and filler.exists():
                    filler.unlink()  # the second attempt failed too: room for the third
            elif requeued_at is not None and job.started_at and job.started_at > requeued_at:
                waits.append((job.started_at - requeued_at).total_seconds())
                requeued_at = None
            if job.state in (JobState.done, JobState.failed):
                break
            time.sleep(0.01)
    finally:
        worker.stop()
    job = env.job(job_id)
    assert job.state is JobState.done, job.last_error
    assert job.attempts == 3
    # back-off 1 s, then 2 s (10 % jitter); the defect: all three attempts within 0.6 s
    assert len(waits) == 2, waits
    assert waits[0] >= BACKOFF_S * 0.9, waits
    assert waits[1] >= 2 * BACKOFF_S * 0.9, waits
    assert job.not_before is None


def _unknown_vr_cxr(path: Path, study_uid: str) -> Path:
    """A real chest CR whose Accession Number (0008,0050) carries the unknown VR 'ZZ'."""
    make_cxr(path, study_uid=study_uid, view="PA")
    ds = pydicom.dcmread(path)
    ds.AccessionNumber = "ACC0001"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    at = raw.index(b"\x08\x00\x50\x00SH")  # explicit VR little endian element header
    path.write_bytes(raw[: at + 4] + b"ZZ" + raw[at + 6 :])
    return path


@pytest.mark.timeout(120)
def test_unknown_vr_fails_at_once_with_one_attempt(
    sqlite_env: NodeEnv, model_host: ModelHost
) -> None:
    env = sqlite_env
    study = generate_uid()
    src = _unknown_vr_cxr(env.tmp / "zz.dcm", study)
    env.ingest(src)
    [job_id] = env.queue_all()
    with env.session_factory() as s:
        claimed = jobs_db.claim_next_job(s, owner="t/w0", lease_seconds=60)
    assert claimed is not None and claimed.id == job_id

    [outcome] = run_batch(env.deps, [job_id], model_host, owner="t/w0")

    assert outcome.status == "failed"
    job = env.job(job_id)
    assert job.state is JobState.failed
    assert job.attempts == 1 < job.max_attempts  # not retried
    assert "Unknown Value Representation 'ZZ'" in (job.last_error or "")
    with env.session_factory() as s:
        assert jobs_db.claim_next_job(s, owner="t/w0", lease_seconds=60) is None


def test_a_job_in_backoff_is_not_claimable_until_it_passes(env: NodeEnv) -> None:
    """Repository level, on SQLite and PostgreSQL: ``not_before`` gates the claim."""
    env.add_study(view="PA")
    [job_id] = env.queue_all()
    t0 = utcnow()
    with env.session_factory() as s:
        assert jobs_db.claim_next_job(s, owner="o", lease_seconds=60, now=t0) is not None
    with env.session_factory() as s:
        job = jobs_db.fail_job(
            s, job_id, owner="o", error="OSError: ENOSPC", retry_delay=lambda n: 30.0 * n, now=t0
        )
    assert job.state is JobState.queued and job.not_before == t0 + timedelta(seconds=30)
    assert "retry not before" in (job.last_error or "")
    with env.session_factory() as s:
        assert (
            jobs_db.claim_next_job(s, owner="o", lease_seconds=60, now=t0 + timedelta(seconds=29))
            is None
        )
    with env.session_factory() as s:
        again = jobs_db.claim_next_job(
            s, owner="o", lease_seconds=60, now=t0 + timedelta(seconds=30)
        )
    assert again is not None and again.id == job_id and again.not_before is None


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (TimeoutError("model host"), False),
        (OperationalError("SELECT 1", {}, Exception("server closed the connection")), False),
        (ModelNotReady("model busy for more than 30 s"), False),
        (InferenceError("backend failed"), False),
        (ConnectionFailedError("cannot connect"), False),
        (InvalidDicomError("not DICOM"), True),
        (NotImplementedError("Unknown Value Representation 'ZZ'"), True),
        (TokenLayoutError("vocabulary 50277 is not 51305"), True),
        (ModelInputError("image is not 3x256x256"), True),
        (NoFrontalImageError("1 instance: LL"), True),
        (PixelDataError("truncated", attribute="Pixel Data (7FE0,0010)"), True),
        (JobFailure("x", permanent=False, stage="load"), False),
    ],
)
def test_errors_are_classified_by_type(exc: BaseException, permanent: bool) -> None:
    assert is_permanent(exc) is permanent
