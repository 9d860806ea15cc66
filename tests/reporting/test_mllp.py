"""MLLP client (integration.mllp) against real listeners on loopback.

The receiver is hl7apy's ``MLLPServer`` (:func:`tests.receivers.hl7_listener`): it parses
each ORU^R01 at STRICT validation and answers an ACK built with hl7apy. Framing edge cases
(a reply in small pieces larger than one 4096-byte read, a reply over the size limit, TLS)
use plain socket servers, since they are about the byte stream, not HL7.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.dataset import Dataset

from integration.errors import (
    ConnectionFailedError,
    DeliveryTimeoutError,
    Hl7AckError,
    MllpError,
)
from integration.hl7_ack import check_ack
from integration.hl7_oru import (
    build_draft_oru,
    build_withdrawal_oru,
    message_control_id,
)
from integration.mllp import END_BLOCK, START_BLOCK, send_mllp
from tests.helpers import free_port
from tests.receivers import Receiver
from tests.reporting.conftest import PARTIES, RESULT

LONG_FINDINGS = "\n".join(f"Line {i}: lungs are clear, no effusion." for i in range(120))


def _draft(source: Dataset, control: str, findings: str | None = None) -> str:
    result = dataclasses.replace(RESULT, findings=findings)
    return build_draft_oru(source, result, PARTIES, control_id=control)


def test_oru_delivered_and_acknowledged(
    source: Dataset, hl7_listener: tuple[int, Receiver]
) -> None:
    port, receiver = hl7_listener
    control = message_control_id("study", "draft", "1")
    message = _draft(source, control, findings=LONG_FINDINGS)
    assert len(message.encode()) > 16_000  # several TCP reads on the server side
    raw = send_mllp(message, "127.0.0.1", port, connect_timeout=5, read_timeout=10)
    ack = check_ack(raw, control_id=control)
    assert ack.code == "AA"
    (got,) = receiver.received
    assert got.msh.msh_10.to_er7() == control
    pid = got.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_5.to_er7() == "Müller^Jürgen"  # UTF-8 over the wire
    rows = got.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation
    assert len(rows) == 2 + 120 + 1  # notices, findings lines, impression


def test_withdrawal_delivered(source: Dataset, hl7_listener: tuple[int, Receiver]) -> None:
    port, receiver = hl7_listener
    result = dataclasses.replace(RESULT, findings=None)
    message = build_withdrawal_oru(source, result, PARTIES, control_id="W-1", reason="wrong study")
    check_ack(send_mllp(message, "127.0.0.1", port), control_id="W-1")
    order = receiver.received[0].oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == "C"


def test_withdrawal_reason_pasted_with_a_line_break_is_delivered(
    source: Dataset, hl7_listener: tuple[int, Receiver]
) -> None:
    # a reason pasted from a word processor: VT (0x0B) is its manual line break, and is
    # also the MLLP start block; FS (0x1C) the end block. Escaped, it must still go out.
    port, receiver = hl7_listener
    result = dataclasses.replace(RESULT, findings=None)
    reason = "Sent for the wrong study.\x0bSee ticket 42.\x1c\x07"
    message = build_withdrawal_oru(source, result, PARTIES, control_id="W-2", reason=reason)
    check_ack(send_mllp(message, "127.0.0.1", port), control_id="W-2")  # MllpError on HEAD
    order = receiver.received[0].oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == "C"
    note = order.nte[0].nte_3.to_er7()
    assert "Reason: Sent for the wrong study. See ticket 42." in note
    assert not any(ord(c) < 0x20 for c in note)


@pytest.mark.parametrize(
    ("mode", "err_code", "transient"),
    [
        ("AE", "101", False),
        ("AE", "207", True),
        ("AR", "207", True),
        ("AR", "200", False),
    ],
)
def test_negative_acks_from_the_listener(
    source: Dataset,
    hl7_listener: tuple[int, Receiver],
    mode: str,
    err_code: str,
    transient: bool,
) -> None:
    port, receiver = hl7_listener
    receiver.mode, receiver.err_code = mode, err_code
    raw = send_mllp(_draft(source, "NEG-1"), "127.0.0.1", port, read_timeout=10)
    with pytest.raises(Hl7AckError) as caught:
        check_ack(raw, control_id="NEG-1")
    assert caught.value.ack_code == mode
    assert caught.value.error_codes == (err_code,)
    assert caught.value.transient is transient


def test_listener_closes_without_ack(source: Dataset, hl7_listener: tuple[int, Receiver]) -> None:
    port, receiver = hl7_listener
    receiver.mode = "close"
    with pytest.raises(MllpError, match="closed the connection without a reply") as caught:
        send_mllp(_draft(source, "CLOSE-1"), "127.0.0.1", port, read_timeout=10)
    assert caught.value.transient
    assert len(receiver.received) == 1  # it did get (and parse) the message


def test_listener_never_answers(source: Dataset, hl7_listener: tuple[int, Receiver]) -> None:
    port, receiver = hl7_listener
    receiver.mode = "hang"
    started = time.monotonic()
    with pytest.raises(DeliveryTimeoutError) as caught:
        send_mllp(_draft(source, "HANG-1"), "127.0.0.1", port, read_timeout=1.0)
    elapsed = time.monotonic() - started
    assert caught.value.transient
    assert 0.9 <= elapsed < 5.0


def test_connection_refused_is_transient(source: Dataset) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionFailedError) as caught:
        send_mllp(_draft(source, "REF-1"), "127.0.0.1", port, connect_timeout=2)
    assert caught.value.transient


# --- byte-stream cases with plain socket servers -------------------------------------------


@pytest.fixture
def raw_listener() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Start a one-connection TCP server whose behaviour is the given function."""
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []

    def start(behaviour: Callable[[socket.socket], None]) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        sockets.append(server)

        def run() -> None:
            conn, _ = server.accept()
            with conn:
                behaviour(conn)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return int(server.getsockname()[1])

    yield start
    for server in sockets:
        server.close()
    for thread in threads:
        thread.join(timeout=10)


def _read_frame(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(END_BLOCK):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_long_ack_in_small_pieces_is_read_whole(
    raw_listener: Callable[[Callable[[socket.socket], None]], int],
) -> None:
    """A 10 kB ACK sent in 500-byte pieces: one recv(4096), as python-hl7's sync client
    does, would return a cut ACK; this client reads to the end block."""
    text = "x" * 10_000
    reply = f"MSH|^~\\&|RIS||LLMCXR||20240506||ACK|A1|P|2.5.1\rMSA|AA|C1|{text}\r"
    framed = START_BLOCK + reply.encode() + END_BLOCK

    def behaviour(conn: socket.socket) -> None:
        _read_frame(conn)
        for i in range(0, len(framed), 500):
            conn.sendall(framed[i : i + 500])
            time.sleep(0.002)

    port = raw_listener(behaviour)
    raw = send_mllp("MSH|^~\\&|A|B|C|D|20240506||ORU^R01|C1|P|2.5.1\r", "127.0.0.1", port)
    assert raw == reply.encode()
    assert check_ack(raw, control_id="C1").code == "AA"


def test_reply_over_the_size_limit(
    raw_listener: Callable[[Callable[[socket.socket], None]], int],
) -> None:
    def behaviour(conn: socket.socket) -> None:
        _read_frame(conn)
        with contextlib.suppress(OSError):  # the client hangs up once over the limit
            conn.sendall(START_BLOCK + b"MSH|" + b"y" * 200_000)

    port = raw_listener(behaviour)
    with pytest.raises(MllpError, match="exceeds 65536 bytes") as caught:
        send_mllp("MSH|^~\\&|x\r", "127.0.0.1", port, max_reply_bytes=65536)
    assert caught.value.transient


def test_reply_without_start_block(
    raw_listener: Callable[[Callable[[socket.socket], None]], int],
) -> None:
    def behaviour(conn: socket.socket) -> None:
        _read_frame(conn)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    port = raw_listener(behaviour)
    with pytest.raises(MllpError, match="does not start with 0x0B"):
        send_mllp("MSH|^~\\&|x\r", "127.0.0.1", port)


def test_message_with_block_characters_is_refused_before_connecting() -> None:
    with pytest.raises(MllpError) as caught:
        send_mllp("MSH|bad\x1cbyte", "127.0.0.1", free_port())
    assert not caught.value.transient


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(
    raw_listener: Callable[[Callable[[socket.socket], None]], int], tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    reply = b"MSH|^~\\&|RIS||LLMCXR||20240506||ACK|A1|P|2.5.1\rMSA|AA|T1\r"

    def behaviour(conn: socket.socket) -> None:
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                _read_frame(tls)
                tls.sendall(START_BLOCK + reply + END_BLOCK)
        except (ssl.SSLError, OSError):
            pass  # the untrusting client below aborts the handshake

    client_ctx = ssl.create_default_context(cafile=str(cert))
    port = raw_listener(behaviour)
    raw = send_mllp(
        "MSH|^~\\&|x\r", "127.0.0.1", port, ssl_context=client_ctx, server_hostname="localhost"
    )
    assert check_ack(raw, control_id="T1").accepted

    port = raw_listener(behaviour)
    with pytest.raises(ConnectionFailedError, match="TLS handshake"):
        send_mllp(
            "MSH|^~\\&|x\r",
            "127.0.0.1",
            port,
            ssl_context=ssl.create_default_context(),  # does not trust the self-signed cert
            server_hostname="localhost",
        )
