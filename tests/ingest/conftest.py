"""Fixtures for the ingest tests: the node's storage SCP in-process on a free loopback port,
backed by a real database (SQLite file, or a fresh PostgreSQL schema) and a real spool."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from integration.ae import build_storage_ae
from integration.scp import handlers
from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade
from node.db.models import Instance, Job, Study
from node.db.study_completion import CompletionResult, complete_quiet_studies
from node.runtime.ingest import IngestSink
from node.runtime.spool import Spool
from node.settings import Settings, load_settings
from tests.dicom.conftest import dcmtk_binary
from tests.helpers import free_port
from tests.node.conftest import db_url, pg_schema_url  # noqa: F401  (fixtures)

NODE_AET = "LLMCXR"
PACS_AET = "PACS"
DICM_OFFSET = 132


def dcmtk(name: str) -> str:
    """DCMTK's ``name`` (not pynetdicom's same-named app), or skip."""
    return dcmtk_binary(name)


def dataset_bytes(path: Path) -> bytes:
    """The data set part of a Part 10 file: everything after the file meta group."""
    from pydicom.filereader import data_element_generator, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        for _ in data_element_generator(
            fh, False, True, stop_when=lambda tag, vr, length: tag.group != 2
        ):
            pass
        return fh.read()


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class RunningSCP:
    """The node's SCP under test."""

    port: int
    settings: Settings
    spool: Spool
    sink: IngestSink
    engine: Engine
    session_factory: sessionmaker[Session]
    server: Any

    def rows(self) -> list[Instance]:
        """All instance rows."""
        with self.session_factory() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def row(self, sop_uid: str) -> Instance | None:
        """The instance row of ``sop_uid``."""
        with self.session_factory() as s:
            return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).first()

    def spooled(self, sop_uid: str) -> Path:
        """The spool file SQL points to for ``sop_uid``."""
        r = self.row(sop_uid)
        assert r is not None, f"no row for {sop_uid}"
        return self.spool.root / r.spool_path

    def spool_files(self) -> list[Path]:
        """Every .dcm file in the spool."""
        return sorted(self.spool.root.rglob("*.dcm"))

    def stop(self) -> None:
        """Shut the SCP down and close the database connections."""
        self.server.shutdown()
        self.engine.dispose()


def scp_settings(
    tmp_path: Path,
    database_url: str,
    port: int,
    *,
    allowed_aes: str = PACS_AET,
    min_free_disk_mb: int = 0,
    **overrides: Any,
) -> Settings:
    """Settings of an ingest test's SCP: AE :data:`NODE_AET` on ``port``, 10 s timeouts.

    Parameters
    ----------
    tmp_path
        The spool is ``tmp_path / "spool"``.
    database_url
        The node database.
    port
        The SCP's loopback port.
    allowed_aes
        Calling AE titles admitted (default :data:`PACS_AET`).
    min_free_disk_mb
        Free-disk floor of the spool (default none).
    **overrides
        Further ``load_settings`` keywords.

    Returns
    -------
    Settings
        The validated settings.
    """
    return load_settings(
        ae_title=NODE_AET,
        port=port,
        allowed_aes=allowed_aes,
        spool_dir=tmp_path / "spool",
        database_url=database_url,
        min_free_disk_mb=min_free_disk_mb,
        acse_timeout=10,
        dimse_timeout=10,
        network_timeout=10,
        **overrides,
    )


def start_scp(
    tmp_path: Path,
    database_url: str,
    *,
    allowed_aes: str = PACS_AET,
    spool: Spool | None = None,
    min_free_disk_mb: int = 0,
    migrate: bool = True,
    **overrides: Any,
) -> RunningSCP:
    """Start the node's SCP (AE + handlers + IngestSink) in-process on a free port.

    ``overrides`` are further settings (``load_settings`` keywords), e.g. ``priority_rules``.
    """
    port = free_port()
    settings = scp_settings(
        tmp_path,
        database_url,
        port,
        allowed_aes=allowed_aes,
        min_free_disk_mb=min_free_disk_mb,
        study_quiet_seconds=1.0,
        **overrides,
    )
    engine = make_engine(database_url)
    if migrate:
        upgrade(engine)
    factory = make_session_factory(engine)
    spool = spool or Spool(settings.spool_dir)
    sink = IngestSink(settings=settings, session_factory=factory, spool=spool)
    server = serve_storage(settings, sink, port)
    return RunningSCP(port, settings, spool, sink, engine, factory, server)


def serve_storage(settings: Settings, sink: IngestSink, port: int) -> ThreadedAssociationServer:
    """The node's storage AE (as ``settings`` configure it) serving ``sink`` on ``port``.

    Parameters
    ----------
    settings
        AE title, allowed AEs, association limit and timeouts.
    sink
        Where received instances go (the SCP's event handlers).
    port
        Loopback port to listen on.

    Returns
    -------
    ThreadedAssociationServer
        The running server (not blocking); ``shutdown()`` stops it.
    """
    ae = build_storage_ae(
        ae_title=settings.ae_title,
        allowed_aes=settings.allowed_aes,
        max_associations=settings.max_associations,
        acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout,
    )
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers(sink))
    assert server is not None  # block=False returns the server
    return server


@pytest.fixture
def scp(tmp_path: Path, db_url: str) -> Iterator[RunningSCP]:  # noqa: F811
    """The SCP on SQLite and (marked postgres) PostgreSQL."""
    node = start_scp(tmp_path, db_url)
    yield node
    node.stop()


@pytest.fixture
def sqlite_scp(tmp_path: Path) -> Iterator[RunningSCP]:
    """The SCP on a SQLite file only (for tests whose subject is not the database)."""
    node = start_scp(tmp_path, f"sqlite:///{tmp_path / 'node.sqlite3'}")
    yield node
    node.stop()


def cxr_dataset(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    body_part: str = "CHEST",
    modality: str = "DX",
    rows: int = 64,
    cols: int = 64,
    pixels: np.ndarray | None = None,
    series_number: int = 1,
    instance_number: int = 1,
) -> Dataset:
    """A small valid image instance (Secondary Capture, 8-bit MONOCHROME2) for tests."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Test^Ingest"
    ds.PatientID = "INGEST-1"
    ds.Modality = modality
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    ds.StudyDescription = f"{body_part} X-RAY"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    img = pixels if pixels is not None else (np.arange(rows * cols) % 251).astype(np.uint8)
    img = img.reshape(rows, cols) if img.ndim == 1 else img
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.astype(np.uint8).tobytes()
    return ds


def nih_png_dataset(png: Path, **kw: Any) -> Dataset:
    """A Secondary Capture CXR built from an NIH ChestX-ray14 PNG (8-bit, CHEST)."""
    img = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    return cxr_dataset(pixels=img, **kw)


def write(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file."""
    ds.save_as(path, enforce_file_format=True)
    return path


def scu(calling: str = PACS_AET) -> AE:
    """A pynetdicom storage SCU proposing the test SOP classes uncompressed."""
    from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation
    from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid in (
        SecondaryCaptureImageStorage,
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
    ):
        for ts in DEFAULT_TRANSFER_SYNTAXES[:2]:  # one context each: raw sends need an exact one
            ae.add_requested_context(uid, ts)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


StoreFn = Callable[[Dataset], int]


def store(node: RunningSCP, datasets: list[Dataset], *, calling: str = PACS_AET) -> list[int]:
    """Send ``datasets`` over one association; return the statuses."""
    assoc = scu(calling).associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def store_file(node: RunningSCP, path: Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """Send a Part 10 file's bytes as they are (pynetdicom chunked send); return the rsp."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def study_jobs(node: RunningSCP, study_uid: str) -> list[Job]:
    """The jobs of a study, oldest first."""
    with node.session_factory() as s:
        return list(
            s.scalars(
                select(Job)
                .join(Study, Job.study_id == Study.id)
                .where(Study.study_instance_uid == study_uid)
                .order_by(Job.id)
            )
        )


def complete_studies(node: RunningSCP, *, after: float) -> list[CompletionResult]:
    """Run the completion sweep as if ``after`` seconds had passed since now."""
    with node.session_factory() as s:
        return complete_quiet_studies(
            s,
            quiet_seconds=node.settings.study_quiet_seconds,
            max_wait_seconds=node.settings.study_max_wait_seconds,
            now=datetime.now(UTC) + timedelta(seconds=after),
            rule=node.settings.chest_rule,
        )
