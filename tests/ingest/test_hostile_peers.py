"""Hostile DICOM peers against the node's SCP, on loopback (docs/security.md, "DICOM network:
associations and PDUs"; issue #22 items 3 and 4).

Every attack runs against the real SCP (``integration.ae.build_storage_ae``, served by
``integration.transport.BoundedAssociationServer``) with real sockets and real pynetdicom
peers; the memory tests run ``cxr-node serve`` as a subprocess and read its ``VmHWM`` (peak
resident set) from ``/proc``. Well-behaved senders come from 127.0.0.2 when they play "another
host" (the whole of 127.0.0.0/8 is loopback on Linux), attackers from 127.0.0.1.

Bounds carry wide margins for a loaded 2-core CI machine, yet fail when the defect returns:
before, a 512 MB PDU header cost +1 GB per connection, a 150 MB C-STORE +580 MB, and 10 silent
sockets (or 6 under TLS) blocked every other caller for 30 s (60 s).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from integration.ae import build_storage_ae
from integration.guarded_socket import GuardedSocket
from integration.pdu_framer import PduFramer
from integration.scp import handlers
from integration.transport import BoundedAssociationServer, GuardedRequestHandler
from integration.transport_limits import TransportLimits
from node.settings import ConfigError, load_settings
from tests.delivery.conftest import PKI, pki  # noqa: F401  (session fixture)
from tests.helpers import free_port, node_env, spawn_node, terminate, wait_for
from tests.ingest.conftest import (
    NODE_AET,
    PACS_AET,
    RunningSCP,
    cxr_dataset,
    dataset_bytes,
    start_scp,
)

VERIFICATION = "1.2.840.10008.1.1"
OTHER_HOST = "127.0.0.2"
ATTACKER = "127.0.0.1"
A_ABORT_INVALID_PARAMETER = bytes.fromhex("07000000000400000206")
A_ASSOCIATE_RJ_LOCAL_LIMIT = bytes.fromhex("03000000000400020302")

pytestmark = pytest.mark.integration


# --- peers --------------------------------------------------------------------------------


def _scu(calling: str = PACS_AET) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.add_requested_context(cxr_dataset().SOPClassUID, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.connection_timeout = 5
    return ae


def _associate(port: int, source: str, tls: ssl.SSLContext | None = None) -> Association:
    kwargs: dict[str, Any] = {"ae_title": NODE_AET, "bind_address": (source, 0)}
    if tls is not None:
        kwargs["tls_args"] = (tls, "127.0.0.1")
    return _scu().associate("127.0.0.1", port, **kwargs)


def _echo(port: int, source: str, tls: ssl.SSLContext | None = None) -> bool:
    """One C-ECHO from ``source``; whether it answered Success."""
    assoc = _associate(port, source, tls)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return rsp is not None and int(getattr(rsp, "Status", -1)) == 0
    finally:
        assoc.release()


def _seconds_until_echo(
    port: int, source: str, *, limit: float, tls: ssl.SSLContext | None = None
) -> float:
    """Seconds until a C-ECHO from ``source`` succeeds (retrying); fail after ``limit``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if _echo(port, source, tls):
            return time.monotonic() - t0
        time.sleep(0.2)
    pytest.fail(f"no C-ECHO from {source} succeeded within {limit} s")


def _silent(port: int, n: int, source: str = ATTACKER) -> list[socket.socket]:
    """``n`` TCP connections that never send a byte."""
    return [
        socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        for _ in range(n)
    ]


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What ``sock`` received until the node closed it, or ``None`` if still open."""
    sock.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:  # reset
            return got
        if not chunk:
            return got
        got += chunk
    return None


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


# --- the node's SCP in-process, with chosen limits ----------------------------------------


@dataclass
class BoundedSCP:
    port: int
    server: BoundedAssociationServer
    node: RunningSCP


@pytest.fixture
def bounded_scp(tmp_path: Path) -> Iterator[Callable[..., BoundedSCP]]:
    """A factory: the node's SCP (real sink, SQLite, spool) with the given AE parameters."""
    node = start_scp(tmp_path, f"sqlite:///{tmp_path / 'node.sqlite3'}")
    started: list[BoundedAssociationServer] = []

    def start(**kwargs: Any) -> BoundedSCP:
        port = free_port()
        params: dict[str, Any] = {
            "ae_title": NODE_AET,
            "max_associations": 10,
            "max_associations_per_address": 4,
            "acse_timeout": 30,  # what used to hold a silent connection's slot
            "dimse_timeout": 10,
            "network_timeout": 10,
            "association_request_timeout": 2,
            "pdu_receive_timeout": 2,
            **kwargs,
        }
        ae = build_storage_ae(**params)
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers(node.sink))
        assert isinstance(server, BoundedAssociationServer)
        started.append(server)
        return BoundedSCP(port, server, node)

    yield start
    for server in started:
        for assoc in server.active_associations:
            assoc.abort()
        server.shutdown()
    node.stop()


# --- the node as a process (memory) ----------------------------------------------------------


@dataclass
class NodeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    spool: Path
    log: Path

    def memory_mib(self) -> dict[str, float]:
        """``VmRSS`` and ``VmHWM`` (peak) of the node process, in MiB."""
        out: dict[str, float] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024
        return out


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[NodeProcess]:
    """``cxr-node serve`` (SCP + chores, SQLite) in a subprocess with default network bounds."""
    port = free_port()
    env = node_env(
        port,
        tmp_path,
        {
            "CXR_NODE_AE_TITLE": NODE_AET,
            "CXR_NODE_HOST": "127.0.0.1",
            "CXR_NODE_STUDY_QUIET_SECONDS": "3600",
            "CXR_NODE_STUDY_MAX_WAIT_SECONDS": "7200",
            "CXR_NODE_API_ENABLED": "false",
            "CXR_NODE_LOG_LEVEL": "INFO",
        },
    )
    log = tmp_path / "node.log"
    proc = spawn_node(env, log)
    node = NodeProcess(proc, port, tmp_path / "spool", log)
    try:
        # ready when a C-ECHO works; the bare probe before it holds a slot of 127.0.0.3 (not
        # of the addresses the tests use) until the ARTIM timer
        wait_for(lambda: proc.poll() is not None or _port_open(port, "127.0.0.3"), timeout=60)
        wait_for(lambda: proc.poll() is not None or _echo(port, "127.0.0.4"), timeout=30)
        assert proc.poll() is None, f"node exited:\n{log.read_text()[-3000:]}"
        yield node
    finally:
        terminate(proc, timeout=30)


def _tls_contexts(pki: PKI) -> tuple[ssl.SSLContext, ssl.SSLContext]:  # noqa: F811
    """The node's server context (client certificates required, 2 s handshake) and the
    PACS's client context, both from the test PKI.

    Parameters
    ----------
    pki
        The test CA and its leaf certificates.

    Returns
    -------
    tuple of ssl.SSLContext
        (server context, client context).
    """
    from node.tls import build_client_context, build_server_context

    server_ctx = build_server_context(
        cert_file=pki.node_cert, key_file=pki.node_key, ca_file=pki.ca, handshake_timeout=2
    )
    client_ctx = build_client_context(
        ca_file=pki.ca, cert_file=pki.pacs_cert, key_file=pki.pacs_key
    )
    return server_ctx, client_ctx


def _port_open(port: int, source: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5, source_address=(source, 0)):
            return True
    except OSError:
        return False


def _big_instance(path: Path, megabytes: int) -> Dataset:
    side = int((megabytes * 1_000_000 / 2) ** 0.5)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientID = "DX", "CHEST", "HOSTILE-1"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(side * side, dtype=np.uint32) % 4096).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


# --- memory -----------------------------------------------------------------------------------


def test_a_512_mb_pdu_header_is_refused_before_it_is_read(node_process: NodeProcess) -> None:
    before = node_process.memory_mib()
    header = struct.pack(">BBL", 0x01, 0, 512 * 1024 * 1024)  # A-ASSOCIATE-RQ, 512 MiB
    # one attacker sends the header alone: it gets A-ABORT (invalid-PDU-parameter value)
    probe = socket.create_connection(("127.0.0.1", node_process.port), timeout=5)
    try:
        probe.sendall(header)
        t0 = time.monotonic()
        got = _closed_within(probe, 10)
        assert got is not None, "the node kept the connection open"
        assert time.monotonic() - t0 < 5
        assert got == A_ABORT_INVALID_PARAMETER
    finally:
        probe.close()

    # four more push the body as fast as loopback goes; the node closes each at once
    chunk = b"\0" * (1 << 20)

    def flood(sent: list[int]) -> None:
        with socket.create_connection(("127.0.0.1", node_process.port), timeout=5) as s:
            s.sendall(header)
            try:
                for _ in range(512):
                    s.sendall(chunk)
                    sent[0] += len(chunk)
            except OSError:
                pass

    counts = [[0] for _ in range(4)]
    threads = [threading.Thread(target=flood, args=(c,), daemon=True) for c in counts]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert time.monotonic() - t0 < 20
    assert all(c[0] < 64 << 20 for c in counts), f"the node read on: {counts}"
    after = node_process.memory_mib()
    # before the fix: +1 GB for one such connection, +2.6 GB for four
    assert after["VmHWM"] - before["VmHWM"] < 64, (before, after)
    log = node_process.log.read_text()
    assert "claims 536870912 bytes, above the limit of 65536" in log
    assert _echo(node_process.port, OTHER_HOST)


def test_a_large_c_store_costs_bounded_memory(node_process: NodeProcess, tmp_path: Path) -> None:
    path = tmp_path / "big.dcm"
    ds = _big_instance(path, 120)
    size = path.stat().st_size
    assert size > 110_000_000
    before = node_process.memory_mib()
    # pynetdicom fragments P-DATA to the Maximum Length the node advertises; before the fix
    # the node advertised none, so the instance came as one PDU, buffered ~4 times (+460 MB)
    assoc = _associate(node_process.port, OTHER_HOST)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 1 << 20
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert int(rsp.Status) == 0x0000
    after = node_process.memory_mib()
    assert after["VmHWM"] - before["VmHWM"] < 100, (before, after)
    stored = list(node_process.spool.rglob(f"{ds.SOPInstanceUID}.*.dcm"))
    assert len(stored) == 1 and dataset_bytes(stored[0]) == dataset_bytes(path)


def test_a_data_set_that_would_stay_in_memory_is_refused(node_process: NodeProcess) -> None:
    """pynetdicom keeps the data set of any message but a C-STORE-RQ in memory until its last
    fragment: before, a C-ECHO-RQ claiming a data set took +1 MB per MB its sender sent."""
    before = node_process.memory_mib()
    assoc = _associate(node_process.port, ATTACKER)
    assert assoc.is_established
    context = assoc.accepted_contexts[0].context_id
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]  # the attacker's own socket
    assert raw is not None
    command = _command_set(0x0030, data_set=True)  # C-ECHO-RQ "with" a data set
    fragment = b"\0" * ((1 << 20) - 12)  # fills a 1 MiB P-DATA-TF PDU

    def pdv(mch: int, data: bytes) -> bytes:
        item = struct.pack(">LBB", len(data) + 2, context, mch) + data
        return struct.pack(">BBL", 0x04, 0, len(item)) + item

    raw.sendall(pdv(0x03, command))
    sent = 0
    with contextlib.suppress(OSError):
        for _ in range(256):
            raw.sendall(pdv(0x00, fragment))
            sent += 1
    assert sent < 64, "the node read on"
    wait_for(lambda: not assoc.is_alive(), timeout=10)
    assert assoc.is_aborted
    after = node_process.memory_mib()
    assert after["VmHWM"] - before["VmHWM"] < 64, (before, after)
    assert "only a C-STORE-RQ may carry a large data set" in node_process.log.read_text()


# --- PDU limits after the association, plain and TLS -------------------------------------


def test_a_p_data_pdu_above_the_maximum_length_aborts_the_association(
    bounded_scp: Callable[..., BoundedSCP],
) -> None:
    scp = bounded_scp(maximum_pdu_size=64 * 1024)
    assoc = _associate(scp.port, ATTACKER)
    assert assoc.is_established and assoc.acceptor.maximum_length == 64 * 1024
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]  # the attacker's own socket
    assert raw is not None
    raw.sendall(struct.pack(">BBL", 0x04, 0, 64 * 1024 + 1))  # P-DATA-TF, 1 byte too long
    wait_for(lambda: not assoc.is_alive(), timeout=10)
    assert assoc.is_aborted
    # PDUs of exactly the Maximum Length are fine: a 256 KB instance in 64 KiB fragments
    store = _associate(scp.port, ATTACKER)
    try:
        assert int(store.send_c_store(cxr_dataset(rows=512, cols=512)).Status) == 0
    finally:
        store.release()


def test_a_tls_association_with_an_oversized_pdu_is_aborted(
    bounded_scp: Callable[..., BoundedSCP],
    pki: PKI,  # noqa: F811
) -> None:
    server_ctx, client_ctx = _tls_contexts(pki)
    scp = bounded_scp(ssl_context=server_ctx)
    assoc = _associate(scp.port, ATTACKER, client_ctx)
    assert assoc.is_established
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert isinstance(raw, ssl.SSLSocket)
    raw.sendall(struct.pack(">BBL", 0x04, 0, 512 * 1024 * 1024))
    wait_for(lambda: not assoc.is_alive(), timeout=10)
    assert assoc.is_aborted
    assert _echo(scp.port, OTHER_HOST, client_ctx)


# --- connection slots ------------------------------------------------------------------------


def test_silent_sockets_do_not_stop_other_senders(
    bounded_scp: Callable[..., BoundedSCP], caplog: pytest.LogCaptureFixture
) -> None:
    scp = bounded_scp(association_request_timeout=3)  # 10 in all, 4 per address
    # an address with 3 silent sockets is still served, up to its limit of 4
    neighbour = "127.0.0.5"
    held = _silent(scp.port, 3, source=neighbour)
    try:
        assert _echo(scp.port, neighbour)
        # 16 silent sockets from one address: 4 get a slot, 12 are refused at once
        attack = _silent(scp.port, 16)
        held += attack
        wait_for(lambda: scp.server.slots.open_connections(ATTACKER) == 4, timeout=5)
        for s in attack:
            s.sendall(b"\x01\x00")  # the start of an A-ASSOCIATE-RQ, never finished
        answers = [_closed_within(s, 8) for s in attack]
        # the refused: A-ASSOCIATE-RJ local-limit-exceeded; the 4 with a slot: A-ABORT when
        # their A-ASSOCIATE-RQ is not complete 3 s after they connected
        abort_late = bytes.fromhex("07000000000400000200")
        assert sorted(answers, key=repr) == sorted(
            [A_ASSOCIATE_RJ_LOCAL_LIMIT] * 12 + [abort_late] * 4, key=repr
        ), answers
        # one log line per address per 10 s, however many are refused
        refusals = [r for r in caplog.records if "refused (A-ASSOCIATE-RJ" in r.getMessage()]
        assert len(refusals) <= 1
    finally:
        _close_all(held)
    wait_for(lambda: scp.server.slots.open_connections() == 0, timeout=10)


def test_another_host_is_served_while_an_address_is_at_its_limit(
    bounded_scp: Callable[..., BoundedSCP],
) -> None:
    scp = bounded_scp(association_request_timeout=3)
    attack = _silent(scp.port, 16)
    try:
        wait_for(lambda: scp.server.slots.open_connections(ATTACKER) == 4, timeout=5)
        # before, 10 such sockets kept every caller out for the whole ACSE timeout (30 s)
        assert _seconds_until_echo(scp.port, OTHER_HOST, limit=5) < 3
        assoc = _associate(scp.port, OTHER_HOST)  # a real C-STORE too
        try:
            assert int(assoc.send_c_store(cxr_dataset()).Status) == 0
        finally:
            assoc.release()
        assert scp.server.slots.open_connections(ATTACKER) == 4  # still held meanwhile
        # the silent four are closed by the ARTIM timer (3 s), the rest sooner; then the
        # address is served again
        for s in attack:
            assert _closed_within(s, 8) is not None
        assert _seconds_until_echo(scp.port, ATTACKER, limit=8) < 5
    finally:
        _close_all(attack)
    wait_for(lambda: scp.server.slots.open_connections() == 0, timeout=10)


def test_trickling_peers_are_cut_and_do_not_delay_others(
    bounded_scp: Callable[..., BoundedSCP],
) -> None:
    scp = bounded_scp()
    # two trickle an A-ASSOCIATE-RQ (200 bytes, one byte every 0.25 s)
    rq = [socket.create_connection(("127.0.0.1", scp.port), timeout=5) for _ in range(2)]
    for s in rq:
        s.sendall(struct.pack(">BBL", 0x01, 0, 200))
    # two associate, then trickle a P-DATA-TF PDU (1000 bytes, 16 bytes every 0.25 s)
    assocs = [_associate(scp.port, ATTACKER) for _ in range(2)]
    assert all(a.is_established for a in assocs)
    pdata = [a.dul.socket.socket for a in assocs]  # type: ignore[union-attr]
    for raw in pdata:
        assert raw is not None
        raw.sendall(struct.pack(">BBL", 0x04, 0, 1000))
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.25):
            for s in rq:
                with contextlib.suppress(OSError):
                    s.send(b"\x00")
            for raw in pdata:
                with contextlib.suppress(OSError):
                    raw.send(b"\x00" * 16)  # type: ignore[union-attr]

    t = threading.Thread(target=trickle, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        # meanwhile another host sends without delay
        assert _seconds_until_echo(scp.port, OTHER_HOST, limit=5) < 3
        # the request tricklers are cut at 2 s, the P-DATA tricklers 2 s into their PDU
        for s in rq:
            assert _closed_within(s, 8) is not None
        wait_for(lambda: not any(a.is_alive() for a in assocs), timeout=8)
        assert all(a.is_aborted for a in assocs)
        assert time.monotonic() - t0 < 8  # before: as long as the trickle lasted
    finally:
        stop.set()
        t.join(timeout=5)
        _close_all(rq)
    wait_for(lambda: scp.server.slots.open_connections() == 0, timeout=10)


def test_silent_sockets_do_not_delay_a_tls_sender(
    bounded_scp: Callable[..., BoundedSCP],
    pki: PKI,  # noqa: F811
) -> None:
    server_ctx, client_ctx = _tls_contexts(pki)
    scp = bounded_scp(ssl_context=server_ctx, tls_handshake_timeout=2)
    held = _silent(scp.port, 6)  # before: each held the accept loop for the handshake timeout
    trickler = socket.create_connection(("127.0.0.1", scp.port), timeout=5)
    try:
        assert _seconds_until_echo(scp.port, OTHER_HOST, limit=5, tls=client_ctx) < 3
        # a handshake that trickles in is cut at its overall deadline, not per read
        t0 = time.monotonic()
        for _ in range(12):
            with contextlib.suppress(OSError):
                trickler.send(b"\x16")  # a byte of a TLS handshake record, every 0.25 s
            time.sleep(0.25)
            if _closed_within(trickler, 0.01) is not None:
                break
        assert _closed_within(trickler, 5) is not None
        assert time.monotonic() - t0 < 6
        for s in held[:4]:
            assert _closed_within(s, 5) is not None
        assert _seconds_until_echo(scp.port, ATTACKER, limit=5, tls=client_ctx) < 3
    finally:
        _close_all([*held, trickler])


def test_a_peer_that_stops_reading_cannot_block_a_send() -> None:
    """pynetdicom sends with ``socket.send`` in a loop; on a guarded socket each send waits at
    most ``send_timeout`` (the node's ``network_timeout``) for a peer that stopped reading."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname()[:2])  # never reads
        accepted, _ = listener.accept()
    sock = GuardedSocket(fileno=accepted.detach())
    sock.install(TransportLimits(send_timeout=1), "127.0.0.1:test")
    chunk = b"\0" * 65536
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            while time.monotonic() - t0 < 30:
                sock.send(chunk)
        assert time.monotonic() - t0 < 15
    finally:
        sock.close()
        peer.close()


def test_reads_ahead_inside_a_pdu_but_never_past_its_end() -> None:
    """pynetdicom reads a PDU 4 KiB at a time; the guarded socket reads ahead inside the PDU
    (one system call for many of pynetdicom's reads) and returns exactly the stream, but
    leaves the next PDU in the kernel, so ``select`` still sees it."""
    rq = struct.pack(">BBL", 1, 0, 4) + b"rq!!"  # the first PDU has its own small limit
    pdu1 = _p_data((0x02, bytes(range(256)) * 1024))  # 256 KiB of data set, one PDU
    pdu2 = _p_data((0x02, b"next" * 100))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname()[:2])
        accepted, _ = listener.accept()
    sock = GuardedSocket(fileno=accepted.detach())
    sock.install(TransportLimits(max_pdu_size=1 << 20), "127.0.0.1:test")
    calls = 0
    real_recv = socket.socket.recv

    def counting(self: socket.socket, n: int, flags: int = 0) -> bytes:
        nonlocal calls
        calls += 1
        return real_recv(self, n, flags)

    try:
        peer.sendall(rq + pdu1 + pdu2)
        time.sleep(0.2)  # every PDU is in the kernel's buffer
        assert sock.recv(6) + sock.recv(4) == rq
        got = bytearray(sock.recv(1))  # the PDU header as pynetdicom reads it: 1, then 5
        got += sock.recv(5)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(socket.socket, "recv", counting)
            while len(got) < len(pdu1):
                chunk = sock.recv(min(4096, len(pdu1) - len(got)))
                assert chunk, "the stream ended early"
                got += chunk
        assert bytes(got) == pdu1
        assert calls <= 8, f"{calls} system reads for a 256 KiB PDU read 4 KiB at a time"
        ready, _, _ = select.select([sock], [], [], 1.0)
        assert ready, "the next PDU must still be in the kernel, visible to select"
        rest = bytearray()
        while len(rest) < len(pdu2):
            rest += sock.recv(len(pdu2) - len(rest))
        assert bytes(rest) == pdu2
    finally:
        sock.close()
        peer.close()


def test_the_association_hook_in_pynetdicom_still_runs(
    bounded_scp: Callable[..., BoundedSCP],
) -> None:
    """``GuardedRequestHandler`` extends pynetdicom's private ``_create_association``: if
    pynetdicom stops calling it, the ARTIM timer is no longer ``association_request_timeout``
    and the slot is not held for the association's life. This fails when that happens."""
    assert hasattr(GuardedRequestHandler.__mro__[1], "_create_association")
    seen: list[float | None] = []
    scp = bounded_scp(association_request_timeout=3.5)
    scp.server.bind(evt.EVT_CONN_OPEN, lambda event: seen.append(event.assoc.acse_timeout))
    assoc = _associate(scp.port, OTHER_HOST)
    try:
        assert assoc.is_established
        assert scp.server.slots.open_connections(OTHER_HOST) == 1
    finally:
        assoc.release()
    assert seen == [3.5]
    wait_for(lambda: scp.server.slots.open_connections() == 0, timeout=5)


# --- pieces -----------------------------------------------------------------------------------


def _command_set(field: int, data_set: bool) -> bytes:
    """A DIMSE command set, Implicit VR Little Endian (PS3.7 6.3.1)."""
    cs = Dataset()
    cs.CommandGroupLength = 0
    cs.AffectedSOPClassUID = VERIFICATION
    cs.CommandField = field
    cs.MessageID = 1
    cs.CommandDataSetType = 0x0000 if data_set else 0x0101
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, cs)
    return buf.getvalue()


def _p_data(*items: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU of PDV items ``(message control header, fragment)``, context 1."""
    body = b"".join(struct.pack(">LBB", len(d) + 2, 1, mch) + d for mch, d in items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _feed(stream: bytes, size: int, **kwargs: int) -> tuple[PduFramer, list[str]]:
    framer = PduFramer(**{"first_limit": 10, "limit": 100, **kwargs})
    reasons = [framer.feed(stream[i : i + size]) for i in range(0, len(stream), size)]
    return framer, [r for r in reasons if r]


def test_framer_finds_every_header_whatever_the_chunks() -> None:
    stream = (
        struct.pack(">BBL", 1, 0, 10)
        + b"r" * 10
        + struct.pack(">BBL", 5, 0, 100)
        + b"x" * 100
        + struct.pack(">BBL", 5, 0, 101)
    )
    for size in (1, 2, 5, 6, 7, 13, 64, len(stream)):
        framer, refused = _feed(stream, size)
        assert len(refused) == 1 and "claims 101 bytes, above the limit of 100" in refused[0]
        assert framer.headers == 3
    _, refused = _feed(struct.pack(">BBL", 1, 0, 11), 6)  # the A-ASSOCIATE-RQ limit
    assert refused and "first PDU (A-ASSOCIATE-RQ)" in refused[0]


def test_framer_bounds_what_pynetdicom_keeps_in_memory() -> None:
    rq = struct.pack(">BBL", 1, 0, 4) + b"rq!!"
    store = _command_set(0x0001, data_set=True)
    echo = _command_set(0x0030, data_set=True)
    limits = {"limit": 4096, "max_command_set": 200, "max_memory_data_set": 100}
    # a C-STORE-RQ's data set goes to a file: any size; then a C-ECHO-RQ without data set
    ok = (
        rq
        + _p_data((0x01, store[:10]), (0x03, store[10:]))
        + _p_data((0x00, b"p" * 1000))
        + _p_data((0x00, b"p" * 1000), (0x02, b"p" * 10))
        + _p_data((0x03, _command_set(0x0030, data_set=False)))
    )
    # any other message's data set stays in memory: 100 bytes at most
    bad = ok + _p_data((0x03, echo), (0x00, b"e" * 60)) + _p_data((0x02, b"e" * 41))
    for size in (1, 3, 7, 64, 1000, len(bad)):
        assert _feed(ok, size, **limits)[1] == []
        _, refused = _feed(bad, size, **limits)
        assert len(refused) == 1 and "Command Field 0x0030 grows over 100 bytes" in refused[0]
    # exactly 100 is fine
    assert _feed(ok + _p_data((0x03, echo), (0x02, b"e" * 100)), 5, **limits)[1] == []
    # a command set that never ends, a PDV item longer than its PDU
    endless = rq + _p_data((0x01, b"c" * 150)) + _p_data((0x01, b"c" * 60))
    assert "command set of more than 200 bytes" in _feed(endless, 9, **limits)[1][0]
    broken = rq + struct.pack(">BBLLBB", 0x04, 0, 6, 50, 1, 0)
    assert "malformed PDV item" in _feed(broken, 4, **limits)[1][0]


def test_limits_are_settings_with_checks(tmp_path: Path) -> None:
    from node.db.engine import make_engine, make_session_factory
    from node.runtime.service import _build_scp

    base: dict[str, Any] = {
        "spool_dir": tmp_path / "spool",
        "database_url": f"sqlite:///{tmp_path / 'n.sqlite3'}",
        "api_port": free_port(),
    }
    for name, bad in (
        ("max_pdu_size", 0),
        ("max_pdu_size", 64 << 20),
        ("max_associations_per_address", 0),
        ("association_request_timeout", 0),
        ("pdu_receive_timeout", -1),
        ("tls_handshake_timeout", 0),
    ):
        with pytest.raises(ConfigError, match=name):
            load_settings(**base, **{name: bad})
    settings = load_settings(
        **base,
        max_pdu_size=256 * 1024,
        max_associations=6,
        max_associations_per_address=2,
        association_request_timeout=3,
        pdu_receive_timeout=7,
        tls_handshake_timeout=4,
    )
    engine = make_engine(settings.database_url)
    try:
        ae, _ = _build_scp(settings, make_session_factory(engine))
    finally:
        engine.dispose()
    assert ae.server_limits() == TransportLimits(
        max_pdu_size=256 * 1024,
        request_timeout=3,
        pdu_timeout=7,
        send_timeout=settings.network_timeout,
        max_connections=6,
        max_connections_per_address=2,
        tls_handshake_timeout=4,
    )
    assert ae.maximum_pdu_size == 256 * 1024
