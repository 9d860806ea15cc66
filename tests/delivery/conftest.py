"""Fixtures for delivery and DICOM TLS tests: databases, draft SR files from RG1, a real
pynetdicom storage SCP playing the PACS, node contexts, and a test PKI (``cryptography``)."""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade
from node.db.models import Delivery, utcnow
from node.runtime.delivery import DeliveryComponent, make_delivery
from node.runtime.service import NodeContext
from node.settings import Settings, load_settings
from tests.helpers import free_port, node_draft_sr, rg1_file
from tests.node.conftest import db_url, pg_schema_url
from tests.node.factories import add_done_job

__all__ = ["db_url", "pg_schema_url"]


# --- draft SR files -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rg1_header() -> Dataset:
    """RG1_UNCR header (a real PA chest CR) without pixel data."""
    return pydicom.dcmread(rg1_file("RG1_UNCR.dcm"), stop_before_pixels=True)


@dataclass
class SRFactory:
    """Writes draft SRs built with :func:`integration.sr.build_draft_sr` from RG1."""

    source: Dataset
    directory: Path
    made: dict[str, Path] = field(default_factory=dict)

    def __call__(self, version: str = "delivery-test") -> tuple[Path, str]:
        """The SR file for model version ``version`` and its SOP Instance UID."""
        if version in self.made:
            path = self.made[version]
            return path, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        sr = node_draft_sr(
            self.source,
            findings="Heart size normal.",
            impression="No acute cardiopulmonary process.",
            version=version,
            series_number=9901,
            instance_number=1,
        )
        path = self.directory / f"sr-{version}.dcm"
        sr.save_as(path, enforce_file_format=True)
        self.made[version] = path
        return path, str(sr.SOPInstanceUID)


@pytest.fixture(scope="session")
def make_sr(tmp_path_factory: pytest.TempPathFactory, rg1_header: Dataset) -> SRFactory:
    """Factory of draft SR files (one per model version; distinct SOP Instance UIDs)."""
    source = copy.deepcopy(rg1_header)
    return SRFactory(source=source, directory=tmp_path_factory.mktemp("sr"))


# --- jobs -----------------------------------------------------------------------------------


def make_job(factory: sessionmaker[Session]) -> int:
    """A study and a ``done`` job (synthetic UID) to hang deliveries on; returns the job id."""
    with factory() as session:
        job = add_done_job(session, f"2.25.{uuid.uuid4().int}", at=utcnow())
        session.commit()
        return job.id


# --- a PACS: pynetdicom storage SCP ---------------------------------------------------------


class PacsSCP:
    """A real pynetdicom Storage SCP on loopback that records what it receives.

    Parameters
    ----------
    port
        TCP port (the same port can be started again after :meth:`stop`).
    status
        DIMSE status every C-STORE is answered with.
    delay
        Seconds each C-STORE handler sleeps (to overlap concurrent senders).
    comment
        Error Comment (0000,0902) sent with the status when not empty.
    ssl_context
        Serve DICOM TLS with this server context.
    """

    def __init__(
        self,
        port: int,
        *,
        aet: str = "PACS",
        status: int = 0x0000,
        delay: float = 0.0,
        comment: str = "",
        ssl_context: Any = None,
    ) -> None:
        self.port = port
        self.aet = aet
        self.status = status
        self.delay = delay
        self.comment = comment
        self.ssl_context = ssl_context
        self.received: list[str] = []  # SOP Instance UIDs, one per C-STORE
        self.calling: list[str] = []
        self._lock = threading.Lock()
        self._server: Any = None
        self._ae: AE | None = None

    @property
    def address(self) -> str:
        """``AET@127.0.0.1:port`` (the destination text)."""
        return f"{self.aet}@127.0.0.1:{self.port}"

    def _on_store(self, event: evt.Event) -> int | Dataset:
        if self.delay:
            time.sleep(self.delay)
        ds = event.dataset  # type: ignore[attr-defined]
        with self._lock:
            self.received.append(str(ds.SOPInstanceUID))
            self.calling.append(str(event.assoc.requestor.ae_title).strip())
        if not self.comment:
            return self.status
        rsp = Dataset()
        rsp.Status = self.status
        rsp.ErrorComment = self.comment
        return rsp

    def start(self) -> PacsSCP:
        """Start listening (non-blocking)."""
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self.ssl_context,
        )
        self._ae = ae
        return self

    def stop(self) -> None:
        """Stop listening and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def count(self, sop_uid: str) -> int:
        """How many times ``sop_uid`` was stored."""
        with self._lock:
            return self.received.count(sop_uid)


@pytest.fixture
def pacs_factory() -> Iterator[Callable[..., PacsSCP]]:
    """Start :class:`PacsSCP` instances; all are stopped at teardown."""
    started: list[PacsSCP] = []

    def start(port: int | None = None, **kwargs: Any) -> PacsSCP:
        scp = PacsSCP(port or free_port(), **kwargs).start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


# --- node contexts --------------------------------------------------------------------------


@dataclass
class NodeDB:
    """A migrated database for a node's delivery component."""

    url: str
    engine: Engine
    factory: sessionmaker[Session]

    def delivery(self, delivery_id: int) -> Delivery:
        """The ``deliveries`` row ``delivery_id`` as it is now (a fresh session).

        Parameters
        ----------
        delivery_id
            Its primary key; the row must exist.

        Returns
        -------
        Delivery
            The row, detached from its closed session.
        """
        with self.factory() as s:
            return s.get_one(Delivery, delivery_id)


@pytest.fixture
def node_db(db_url: str) -> Iterator[NodeDB]:
    """A migrated database (SQLite file or fresh PostgreSQL schema)."""
    upgrade(db_url)
    eng = make_engine(db_url)
    yield NodeDB(db_url, eng, make_session_factory(eng))
    eng.dispose()


@pytest.fixture
def senders() -> Iterator[list[DeliveryComponent]]:
    """Delivery components started by a test; stopped at teardown."""
    started: list[DeliveryComponent] = []
    yield started
    for c in started:
        c.stop()


def delivery_settings(db: NodeDB, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a delivery test: tiny backoff, short timeouts, no API."""
    values: dict[str, Any] = {
        "database_url": db.url,
        "spool_dir": tmp_path / "spool",
        "min_free_disk_mb": 0,
        "api_enabled": False,
        "api_port": free_port(),
        "ae_title": "LLMCXR",
        "acse_timeout": 5.0,
        "dimse_timeout": 5.0,
        "network_timeout": 5.0,
        "delivery_backoff_seconds": 0.05,
        "delivery_max_backoff_seconds": 0.2,
        "delivery_max_attempts": 50,
    }
    values.update(overrides)
    return load_settings(**values)


def node_context(db: NodeDB, settings: Settings, owner: str = "test-sender") -> NodeContext:
    """A :class:`NodeContext` on ``db``."""
    return NodeContext(
        settings=settings,
        engine=db.engine,
        session_factory=db.factory,
        owner=f"{owner}:{uuid.uuid4().hex[:6]}",
        stop_event=threading.Event(),
    )


def start_sender(
    senders: list[DeliveryComponent], ctx: NodeContext, *, poll_seconds: float
) -> DeliveryComponent:
    """Start the node's delivery component on ``ctx``, as ``cxr-node serve`` builds it.

    Parameters
    ----------
    senders
        The :func:`senders` fixture's list: the component is stopped at teardown.
    ctx
        Its node context (:func:`node_context`).
    poll_seconds
        How often it looks for due deliveries.

    Returns
    -------
    DeliveryComponent
        The running component (:func:`node.runtime.delivery.make_delivery`).
    """
    component = make_delivery(ctx)
    component.poll_seconds = poll_seconds
    component.start()
    senders.append(component)
    return component


# --- test PKI -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    """PEM files of a test CA and leaf certificates signed by it."""

    ca: Path
    node_cert: Path
    node_key: Path
    pacs_cert: Path
    pacs_key: Path
    rogue_ca: Path  # another CA: nothing here is signed by it
    rogue_cert: Path  # a leaf signed by the rogue CA
    rogue_key: Path


def _write_pki(directory: Path) -> PKI:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), False)
            .sign(k, hashes.SHA256())
        )
        return cert, k

    def leaf(
        cn: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
            .sign(issuer_key, hashes.SHA256())
        )
        return cert, k

    def write(cert: x509.Certificate, k: ec.EllipticCurvePrivateKey | None, stem: str) -> Path:
        crt = directory / f"{stem}.crt"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if k is not None:
            (directory / f"{stem}.key").write_bytes(
                k.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return crt

    ca_cert, ca_key = ca("cxr-node test CA")
    rogue_cert, rogue_key = ca("rogue test CA")
    node_cert, node_key = leaf("LLMCXR node", ca_cert, ca_key)
    pacs_cert, pacs_key = leaf("PACS", ca_cert, ca_key)
    stranger, stranger_key = leaf("stranger", rogue_cert, rogue_key)
    write(ca_cert, None, "ca")
    write(rogue_cert, None, "rogue-ca")
    write(node_cert, node_key, "node")
    write(pacs_cert, pacs_key, "pacs")
    write(stranger, stranger_key, "stranger")
    return PKI(
        ca=directory / "ca.crt",
        node_cert=directory / "node.crt",
        node_key=directory / "node.key",
        pacs_cert=directory / "pacs.crt",
        pacs_key=directory / "pacs.key",
        rogue_ca=directory / "rogue-ca.crt",
        rogue_cert=directory / "stranger.crt",
        rogue_key=directory / "stranger.key",
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, the node's and the PACS's certificates (SAN 127.0.0.1/localhost), and a rogue."""
    pytest.importorskip("cryptography", reason="pip install cryptography (test dependency)")
    return _write_pki(tmp_path_factory.mktemp("pki"))
