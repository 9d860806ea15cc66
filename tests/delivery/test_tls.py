"""DICOM TLS (PS3.15 B.1) with node.tls: the node's TLS SCP accepts a TLS SCU with a trusted
client certificate and refuses plain TCP, untrusted and missing client certificates; the
sender delivers over TLS and refuses a PACS it cannot verify; bad files name their setting."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from node.db import delivery_views
from node.db import views as views_db
from node.db.engine import make_engine, make_session_factory
from node.db.models import DeliveryState
from node.runtime.delivery import DeliveryComponent, enqueue_deliveries
from node.runtime.service import run_node
from node.settings import ConfigError, Settings, load_settings
from node.tls import build_client_context, build_server_context, client_context, server_context
from tests.delivery.conftest import (
    PKI,
    NodeDB,
    PacsSCP,
    SRFactory,
    delivery_settings,
    make_job,
    node_context,
)
from tests.helpers import free_port, node_thread, port_open, rg1_file, wait_for


@dataclass
class TlsNode:
    settings: Settings
    port: int


@pytest.fixture
def tls_node(tmp_path: Path, pki: PKI) -> Iterator[TlsNode]:
    """The node (run_node: SCP + chores) serving DICOM TLS with client certificates required."""
    port = free_port()
    settings = load_settings(
        port=port,
        api_port=free_port(),
        api_enabled=False,
        ae_title="LLMCXR",
        database_url=f"sqlite:///{tmp_path / 'node.sqlite3'}",
        spool_dir=tmp_path / "spool",
        min_free_disk_mb=0,
        study_quiet_seconds=600,
        study_max_wait_seconds=1200,
        acse_timeout=5,
        dimse_timeout=5,
        network_timeout=5,
        tls_cert_file=pki.node_cert,
        tls_key_file=pki.node_key,
        tls_ca_file=pki.ca,
        tls_require_client_cert=True,
    )
    stop = threading.Event()
    thread, result = node_thread(settings, stop, daemon=True, shutdown_grace_seconds=2)
    try:
        wait_for(lambda: port_open(port) or not thread.is_alive(), timeout=60)
        assert thread.is_alive(), "run_node exited during start-up"
        yield TlsNode(settings, port)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert result == [0]


def _instances(settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine, read_only=True)() as s:
            return views_db.counts(s).instances
    finally:
        engine.dispose()


def _scu(calling: str = "PACS") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.connection_timeout = 5
    return ae


def _store(ae: AE, port: int, ds: Dataset, ctx: ssl.SSLContext | None) -> int | None:
    """C-STORE ``ds``; the status, or None when no association was established."""
    if ctx is None:
        assoc = ae.associate("127.0.0.1", port, ae_title="LLMCXR")
    else:
        assoc = ae.associate("127.0.0.1", port, ae_title="LLMCXR", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if status is not None and "Status" in status else -1
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def rg1() -> Dataset:
    return pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))


@pytest.mark.integration
def test_tls_scu_stores_into_the_node_tls_scp(tls_node: TlsNode, pki: PKI, rg1: Dataset) -> None:
    trusted = build_client_context(ca_file=pki.ca, cert_file=pki.pacs_cert, key_file=pki.pacs_key)
    no_cert = build_client_context(ca_file=pki.ca)
    stranger = build_client_context(
        ca_file=pki.ca, cert_file=pki.rogue_cert, key_file=pki.rogue_key
    )
    ae = _scu()
    try:
        # plain TCP: the TLS handshake fails, no association
        assert _store(ae, tls_node.port, rg1, None) is None
        # TLS without a client certificate, or with one from an unknown CA: refused
        assert _store(ae, tls_node.port, rg1, no_cert) is None
        assert _store(ae, tls_node.port, rg1, stranger) is None
        assert _instances(tls_node.settings) == 0
        # a trusted client certificate: stored (the accept loop survived the failures)
        assert _store(ae, tls_node.port, rg1, trusted) == 0x0000
    finally:
        ae.shutdown()
    assert _instances(tls_node.settings) == 1


@pytest.mark.integration
def test_a_silent_connection_does_not_block_the_tls_accept_loop(
    pki: PKI, pacs_factory: Callable[..., PacsSCP], rg1: Dataset
) -> None:
    server = build_server_context(
        cert_file=pki.pacs_cert, key_file=pki.pacs_key, ca_file=pki.ca, handshake_timeout=0.5
    )
    pacs = pacs_factory(aet="LLMCXR", ssl_context=server)
    trusted = build_client_context(ca_file=pki.ca, cert_file=pki.node_cert, key_file=pki.node_key)
    with socket.create_connection(("127.0.0.1", pacs.port)):  # connects, never says a word
        ae = _scu()
        try:
            assert _store(ae, pacs.port, rg1, trusted) == 0x0000
        finally:
            ae.shutdown()
    assert pacs.received == [str(rg1.SOPInstanceUID)]


@pytest.mark.integration
def test_delivery_over_tls(
    node_db: NodeDB,
    tmp_path: Path,
    pki: PKI,
    make_sr: SRFactory,
    pacs_factory: Callable[..., PacsSCP],
) -> None:
    pacs = pacs_factory(
        ssl_context=build_server_context(
            cert_file=pki.pacs_cert, key_file=pki.pacs_key, ca_file=pki.ca
        )
    )
    # a PACS whose certificate the node cannot verify (issued by another CA)
    impostor = pacs_factory(
        ssl_context=build_server_context(
            cert_file=pki.rogue_cert, key_file=pki.rogue_key, require_client_cert=False
        )
    )
    plain = pacs_factory()  # no TLS at all
    settings = delivery_settings(
        node_db,
        tmp_path,
        destinations=[pacs.address, impostor.address, plain.address],
        tls_destinations=True,
        tls_ca_file=pki.ca,
        tls_cert_file=pki.node_cert,
        tls_key_file=pki.node_key,
    )
    sr_path, sr_uid = make_sr("tls")
    component = DeliveryComponent(node_context(node_db, settings))
    try:
        job = make_job(node_db.factory)
        with node_db.factory() as s:
            ok_id, impostor_id, plain_id = enqueue_deliveries(
                s, job_id=job, sr_path=sr_path, destinations=settings.destinations
            )
        outcomes = {o.delivery_id: o for o in component.run_once()}
    finally:
        component.stop()
    assert outcomes[ok_id].state == "sent"
    assert pacs.received == [sr_uid] and pacs.calling == ["LLMCXR"]
    assert outcomes[impostor_id].state == "retry" and impostor.received == []
    assert outcomes[plain_id].state == "retry" and plain.received == []
    with node_db.factory() as s:
        rows = {d.id: d for d in delivery_views.list_deliveries(s, job_id=job)}
    assert rows[ok_id].state == DeliveryState.sent.value
    for bad in (impostor_id, plain_id):
        assert rows[bad].state == DeliveryState.pending.value and rows[bad].attempts == 1
        assert "cannot connect" in (rows[bad].last_error or "")


def test_settings_build_the_contexts(tmp_path: Path, pki: PKI) -> None:
    base: dict[str, Any] = {"api_port": free_port(), "spool_dir": tmp_path, "min_free_disk_mb": 0}
    plain = load_settings(**base)
    assert server_context(plain) is None and client_context(plain) is None
    tls = load_settings(
        **base,
        tls_cert_file=pki.node_cert,
        tls_key_file=pki.node_key,
        tls_ca_file=pki.ca,
        tls_destinations=True,
    )
    srv, cli = server_context(tls), client_context(tls)
    assert srv is not None and cli is not None
    assert srv.verify_mode is ssl.CERT_REQUIRED
    assert srv.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert cli.verify_mode is ssl.CERT_REQUIRED and cli.check_hostname
    optional = load_settings(
        **base,
        tls_cert_file=pki.node_cert,
        tls_key_file=pki.node_key,
        tls_require_client_cert=False,
    )
    ctx = server_context(optional)
    assert ctx is not None and ctx.verify_mode is ssl.CERT_NONE


def test_unreadable_or_wrong_files_name_the_setting(tmp_path: Path, pki: PKI) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = tmp_path / "missing.key"
    with pytest.raises(ConfigError, match=r"tls_key_file: cannot read .*missing\.key"):
        build_server_context(cert_file=pki.node_cert, key_file=missing, ca_file=pki.ca)
    with pytest.raises(ConfigError, match="tls_cert_file: cannot read"):
        build_server_context(cert_file=tmp_path / "nope.crt", key_file=pki.node_key, ca_file=pki.ca)
    with pytest.raises(ConfigError, match=r"tls_ca_file: .*junk\.pem"):
        build_server_context(cert_file=pki.node_cert, key_file=pki.node_key, ca_file=junk)
    with pytest.raises(ConfigError, match="tls_ca_file: tls_require_client_cert"):
        build_server_context(cert_file=pki.node_cert, key_file=pki.node_key, ca_file=None)
    with pytest.raises(ConfigError, match="tls_cert_file/tls_key_file"):
        build_server_context(cert_file=pki.node_cert, key_file=pki.pacs_key, ca_file=pki.ca)
    with pytest.raises(ConfigError, match="tls_ca_file: cannot read"):
        build_client_context(ca_file=tmp_path / "none.crt")
    # the node refuses to start rather than serve plain TCP by mistake
    settings = load_settings(
        api_port=free_port(),
        port=free_port(),
        api_enabled=False,
        spool_dir=tmp_path / "spool",
        database_url=f"sqlite:///{tmp_path / 'n.sqlite3'}",
        min_free_disk_mb=0,
        tls_cert_file=pki.node_cert,
        tls_key_file=missing,
        tls_ca_file=pki.ca,
    )
    with pytest.raises(ConfigError, match="tls_key_file"):
        run_node(settings, stop_event=threading.Event())
