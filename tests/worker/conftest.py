"""Fixtures for the worker tests: the model host on the demo bundle (``demo_bundle`` of
``tests/conftest.py``, built once), real CXR files, a node env.

Studies are real chest images put through the node's own ingest (``node.runtime.ingest.IngestSink``:
spool + SQL) and queued by the real study-completion query; the database is a SQLite file or
a fresh PostgreSQL schema (``db_url`` from ``tests/node/conftest.py``).
"""

from __future__ import annotations

import copy
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from integration.scp import ReceivedMeta
from integration.status import StoreStatus
from integration.uids import sr_instance_uid
from node.db import drafts as drafts_db
from node.db import study_completion as completion_db
from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade
from node.db.models import Delivery, Draft, Job, utcnow
from node.runtime.ingest import IngestSink
from node.runtime.modelhost import ModelHost
from node.runtime.service import NodeContext
from node.runtime.stages import PipelineDeps
from node.settings import Settings, load_settings
from tests.helpers import require_nih_pngs, rg1_file
from tests.node.conftest import db_url, pg_schema_url  # noqa: F401  (fixtures)

MAX_NEW_TOKENS = 6


def worker_settings(*, db: str, spool: Path, model_dir: Path | None, **overrides: Any) -> Settings:
    """Settings for a worker test: fp32 greedy, few new tokens, fast leases."""
    values: dict[str, Any] = {
        "database_url": db,
        "spool_dir": spool,
        "model_dir": model_dir,
        "backend": "transformers",
        "backend_dtype": "float32",
        "backend_threads": 1,
        "generation_greedy": True,
        "generation_max_new_tokens": MAX_NEW_TOKENS,
        "min_free_disk_mb": 0,
        "api_enabled": False,
        "lease_seconds": 30.0,
    }
    values.update(overrides)
    return load_settings(None, **values)


@pytest.fixture(scope="session")
def model_host(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelHost:
    """One loaded model host on the demo bundle, shared by the in-process tests."""
    tmp = tmp_path_factory.mktemp("host")
    host = ModelHost(
        worker_settings(db=f"sqlite:///{tmp / 'x.sqlite3'}", spool=tmp, model_dir=demo_bundle)
    )
    host.start()
    assert host.wait_ready(300), host.error
    return host


# --- real CXR files ------------------------------------------------------------------------

_rg1_lock = threading.Lock()
_rg1: Dataset | None = None


def _rg1_dataset() -> Dataset:
    global _rg1
    with _rg1_lock:
        if _rg1 is None:
            _rg1 = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
        return _rg1


def nih_pixels(index: int, *, side: int = 256, flip: bool = False) -> np.ndarray:
    """A real NIH ChestX-ray14 frontal image as uint8, resized to ``side``."""
    png = require_nih_pngs()[index % 2]
    img = Image.open(png).convert("L").resize((side, side), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr[:, ::-1]) if flip else arr


def make_cxr(
    path: Path,
    *,
    study_uid: str,
    view: str = "PA",
    pixels: np.ndarray | None = None,
    broken: bool = False,
    series_uid: str | None = None,
) -> Path:
    """Write a chest CR Part 10 file based on the real RG1_UNCR header.

    ``pixels`` (uint8) replaces RG1's pixel data (NIH-derived, MONOCHROME2); ``broken``
    declares twice the rows the pixel data holds (undecodable: PS3.3 C.7.6.3).
    """
    ds = copy.deepcopy(_rg1_dataset())
    sop = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    if pixels is not None:
        for kw in ("WindowCenter", "WindowWidth"):
            if kw in ds:
                delattr(ds, kw)
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelRepresentation = 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = pixels.tobytes()
    if broken:
        ds.Rows = int(ds.Rows) * 2
    ds.save_as(path, enforce_file_format=True)
    return path


# --- a node environment ----------------------------------------------------------------------


@dataclass
class NodeEnv:
    """Database, spool, ingest sink and settings of one test node."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    sink: IngestSink
    tmp: Path

    @property
    def deps(self) -> PipelineDeps:
        """Pipeline dependencies."""
        return PipelineDeps.from_settings(self.settings, self.session_factory)

    def context(self, owner: str = "test-node") -> NodeContext:
        """A node context for components."""
        return NodeContext(
            self.settings, self.engine, self.session_factory, owner, threading.Event()
        )

    def ingest(self, path: Path) -> None:
        """Put a Part 10 file through the node's ingest (consumes a copy)."""
        staged = self.tmp / f"incoming-{generate_uid()}.dcm"
        shutil.copyfile(path, staged)
        ds = pydicom.dcmread(staged, stop_before_pixels=True)
        meta = ReceivedMeta(
            calling_ae="PACS",
            peer_address="127.0.0.1",
            peer_port=104,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            called_ae=self.settings.ae_title,
        )
        result = self.sink.accept(staged, meta)
        assert result.status == StoreStatus.SUCCESS, result

    def add_study(self, **kw: Any) -> str:
        """Write and ingest a one-image study; return its Study Instance UID."""
        study_uid = kw.pop("study_uid", None) or generate_uid()
        path = make_cxr(self.tmp / f"src-{generate_uid()}.dcm", study_uid=study_uid, **kw)
        self.ingest(path)
        path.unlink()
        return study_uid

    def queue_all(self) -> list[int]:
        """Complete every receiving study now (real chest rule); return the queued job ids."""
        with self.session_factory() as s:
            done = completion_db.complete_quiet_studies(
                s,
                quiet_seconds=1.0,
                max_wait_seconds=600.0,
                now=utcnow() + timedelta(seconds=5),
                rule=self.settings.chest_rule,
            )
        return [r.job_id for r in done if r.job_id is not None]

    def job(self, job_id: int) -> Job:
        """The job row."""
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def drafts(self, job_id: int) -> list[Draft]:
        """The job's draft rows."""
        with self.session_factory() as s:
            return list(s.scalars(select(Draft).where(Draft.job_id == job_id)))

    def expected_sr_uid(self, job_id: int) -> str:
        """The SR UID the node must derive for the job's (only) draft: from its study's
        instances, model and text (integration.uids.sr_instance_uid)."""
        [draft] = self.drafts(job_id)
        with self.session_factory() as s:
            study = drafts_db.job_study(s, job_id)
        return sr_instance_uid(
            study.study_uid,
            draft.model_name,
            draft.model_version,
            inputs=[i.sop_instance_uid for i in study.instances],
            findings=draft.findings,
            impression=(draft.impression or "").strip() or draft.full_text.strip(),
        )

    def deliveries(self, job_id: int | None = None) -> list[Delivery]:
        """Delivery rows (of one job)."""
        with self.session_factory() as s:
            stmt = select(Delivery).order_by(Delivery.id)
            if job_id is not None:
                stmt = stmt.where(Delivery.job_id == job_id)
            return list(s.scalars(stmt))


def make_env(db: str, tmp: Path, model_dir: Path | None, **overrides: Any) -> NodeEnv:
    """A migrated database and spool under ``tmp``."""
    settings = worker_settings(db=db, spool=tmp / "spool", model_dir=model_dir, **overrides)
    settings.prepare_runtime()
    engine = make_engine(db)
    upgrade(engine)
    sf = make_session_factory(engine)
    sink = IngestSink(settings=settings, session_factory=sf)
    return NodeEnv(settings, engine, sf, sink, tmp)


@pytest.fixture
def env(db_url: str, tmp_path: Path, demo_bundle: Path) -> Iterator[NodeEnv]:  # noqa: F811
    """A node env on SQLite and PostgreSQL, no destinations."""
    e = make_env(db_url, tmp_path, demo_bundle)
    yield e
    e.engine.dispose()


@pytest.fixture
def sqlite_env(tmp_path: Path, demo_bundle: Path) -> Iterator[NodeEnv]:
    """A node env on SQLite only."""
    e = make_env(f"sqlite:///{tmp_path / 'node.sqlite3'}", tmp_path, demo_bundle)
    yield e
    e.engine.dispose()
