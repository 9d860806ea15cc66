"""MLLP listener (integration.mllp_listener) against real senders on loopback.

The sender is the node's own MLLP client (:func:`integration.mllp.send_mllp`) for whole
messages, and a raw socket for what a client would not send (garbage, oversize frames,
several frames at once, half a frame). The handler is what the node's service does with a
final-report message: :func:`integration.final_report.final_report_from_oru`, its errors
turned into :class:`Hl7Refusal`. Every ACK is parsed back with hl7apy at STRICT validation
and read with :func:`integration.hl7_ack.parse_ack` / ``check_ack``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from integration.errors import ConnectionFailedError, Hl7AckError, MllpError
from integration.final_report import FinalReport, FinalReportError, final_report_from_oru
from integration.hl7_ack import check_ack, parse_ack
from integration.mllp import END_BLOCK, START_BLOCK, send_mllp
from integration.mllp_ack import build_ack
from integration.mllp_listener import Hl7Handler, Hl7Refusal, MllpListener
from tests.reporting.conftest import PATIENT_NAME
from tests.reporting.test_final_report import STUDY_UID, oru


@dataclass
class Inbox:
    """What the handler saw: reports, raw texts and peers."""

    reports: list[FinalReport] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_handler(inbox: Inbox) -> Hl7Handler:
    def handler(text: str, peer: str) -> None:
        with inbox.lock:
            inbox.texts.append(text)
            inbox.peers.append(peer)
        if "BOOM" in text:
            raise RuntimeError(f"database down while storing {PATIENT_NAME}")
        try:
            report = final_report_from_oru(text)
        except FinalReportError as exc:
            raise Hl7Refusal(exc.ack_code, exc.err_code, exc.message) from None
        with inbox.lock:
            inbox.reports.append(report)

    return handler


@pytest.fixture
def served() -> Iterator[tuple[MllpListener, Inbox]]:
    inbox = Inbox()
    listener = MllpListener("127.0.0.1", 0, make_handler(inbox), timeout=3.0)
    listener.start()
    try:
        yield listener, inbox
    finally:
        listener.stop()


def strict(ack: bytes | str) -> Any:
    """The ACK parsed by hl7apy and validated against its v2.5.1 ACK structure.

    An ACK for a message without a readable MSH-10 has an empty MSA-2 (there is nothing
    to echo), which hl7apy reports as a missing required field: such an ACK is parsed
    (STRICT) but not validated.
    """
    text = ack.decode() if isinstance(ack, bytes) else ack
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    if parse_ack(text).control_id:
        assert message.validate() is True
    return message


def raw_exchange(port: int, data: bytes, *, frames: int = 1, wait: float = 5.0) -> list[bytes]:
    """Send ``data`` on one connection; return up to ``frames`` replies until it closes."""
    replies: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        buffer = b""
        while len(replies) < frames:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            buffer += chunk
            while END_BLOCK in buffer:
                reply, buffer = buffer.split(END_BLOCK, 1)
                assert reply.startswith(START_BLOCK)
                replies.append(reply[1:])
    return replies


def framed(text: str, encoding: str = "utf-8") -> bytes:
    return START_BLOCK + text.encode(encoding) + END_BLOCK


# --- through the node's MLLP client ---------------------------------------------------------


def test_final_report_acknowledged(served: tuple[MllpListener, Inbox]) -> None:
    listener, inbox = served
    assert listener.port > 0
    raw = send_mllp(oru(), "127.0.0.1", listener.port, read_timeout=5)
    ack = check_ack(raw, control_id="RIS-0001")
    assert ack.code == "AA"
    message = strict(raw)
    msh = message.msh
    assert msh.msh_3.to_er7() == "CXR-NODE"
    assert (msh.msh_5.to_er7(), msh.msh_6.to_er7()) == ("RIS", "RADIOLOGY")
    assert msh.msh_9.to_er7() == "ACK^R01^ACK"
    assert msh.msh_12.to_er7() == "2.5.1"
    assert msh.msh_10.to_er7() not in ("", "RIS-0001")
    (report,) = inbox.reports
    assert report.study_uid == STUDY_UID
    assert inbox.peers == ["127.0.0.1"]


def test_latin1_message_is_decoded_by_msh18(served: tuple[MllpListener, Inbox]) -> None:
    listener, inbox = served
    message = oru().replace("UNICODE UTF-8", "8859/1")
    raw = send_mllp(message, "127.0.0.1", listener.port, encoding="latin-1")
    assert check_ack(raw, control_id="RIS-0001").accepted
    assert PATIENT_NAME in inbox.texts[0]


@pytest.mark.parametrize(
    ("message", "code", "err", "transient"),
    [
        (lambda: oru(message_type="ORU^R30^ORU_R30"), "AR", "201", False),
        (lambda: oru(message_type="ADT^A01^ADT_A01"), "AR", "200", False),
        (lambda: oru().replace("|RIS-0001|P|", "|RIS-0001|T|"), "AR", "202", False),
        (lambda: oru(status="P"), "AE", "103", False),
        (lambda: oru(observations=[]), "AE", "101", False),
        (lambda: oru().replace("Heart size", "BOOM"), "AE", "207", True),
    ],
)
def test_refusals(
    served: tuple[MllpListener, Inbox],
    caplog: pytest.LogCaptureFixture,
    message: Callable[[], str],
    code: str,
    err: str,
    transient: bool,
) -> None:
    listener, inbox = served
    caplog.set_level(logging.DEBUG)
    raw = send_mllp(message(), "127.0.0.1", listener.port)
    strict(raw)
    with pytest.raises(Hl7AckError) as caught:
        check_ack(raw, control_id="RIS-0001")
    assert (caught.value.ack_code, caught.value.error_codes) == (code, (err,))
    assert caught.value.transient is transient
    assert f"|{err}^" in raw.decode()  # ERR-3 code^text^HL70357
    assert "^HL70357|E|" in raw.decode()
    assert not inbox.reports
    assert PATIENT_NAME not in caplog.text and "Jürgen" not in raw.decode()


# --- raw frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "err"),
    [
        ("hello, this is not HL7", "100"),
        ("PID|1||PAT-123||Müller^Jürgen\rMSH|^~\\&|RIS", "100"),
        ("MSH|^^^|RIS||||20240507||ORU^R01|X-1|P|2.5.1\r", "102"),
        ("MSH|^~\\&|RIS|RAD|||20240507||ORU^R01||P|2.5.1\r", "101"),
        ("MSH|^~\\&|RIS|RAD|||20240507|||X-2|P|2.5.1\r", "101"),
    ],
)
def test_unreadable_msh_gets_ar(served: tuple[MllpListener, Inbox], text: str, err: str) -> None:
    listener, inbox = served
    (reply,) = raw_exchange(listener.port, framed(text))
    ack = parse_ack(reply)
    strict(reply)
    assert (ack.code, ack.error_codes) == ("AR", (err,))
    assert "Müller" not in reply.decode()
    assert not inbox.texts  # the handler never saw it


def test_two_messages_on_one_connection(served: tuple[MllpListener, Inbox]) -> None:
    listener, inbox = served
    first = oru(control="C-1")
    second = oru(control="C-2", status="P").replace("\r", "\n")  # LF separators
    replies = raw_exchange(listener.port, framed(first) + b"\n" + framed(second), frames=2)
    assert [parse_ack(r).control_id for r in replies] == ["C-1", "C-2"]
    assert [parse_ack(r).code for r in replies] == ["AA", "AE"]
    assert len(inbox.texts) == 2


def test_peer_not_allowed_gets_no_reply(caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox()
    handler = make_handler(inbox)
    with MllpListener("127.0.0.1", 0, handler, allowed_hosts=["192.0.2.7"]) as listener:
        with pytest.raises((MllpError, ConnectionFailedError)):
            send_mllp(oru(), "127.0.0.1", listener.port, read_timeout=5)
        assert raw_exchange(listener.port, framed(oru())) == []
    assert not inbox.texts
    assert "127.0.0.1" in caplog.text and "not an allowed host" in caplog.text
    with MllpListener("127.0.0.1", 0, handler, allowed_hosts=["::ffff:127.0.0.1"]) as listener:
        assert check_ack(send_mllp(oru(), "127.0.0.1", listener.port), control_id="RIS-0001")


def test_oversize_frame_dropped(caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox()
    handler = make_handler(inbox)
    with MllpListener("127.0.0.1", 0, handler, max_message_bytes=4096) as listener:
        big = oru(observations=[("TX", "GDT^Report^L", "x" * 150)] * 40)
        assert len(big) > 6000
        assert raw_exchange(listener.port, framed(big)) == []
        assert "over 4096 bytes" in caplog.text
        assert not inbox.texts
        # the listener still serves the next connection
        assert check_ack(send_mllp(oru(), "127.0.0.1", listener.port), control_id="RIS-0001")


def test_idle_and_incomplete_connections_dropped() -> None:
    inbox = Inbox()
    handler = make_handler(inbox)
    with MllpListener("127.0.0.1", 0, handler, timeout=0.5) as listener:
        started = time.monotonic()
        assert raw_exchange(listener.port, START_BLOCK + b"MSH|^~\\&|RIS") == []
        assert raw_exchange(listener.port, b"") == []
        assert time.monotonic() - started < 4
        assert raw_exchange(listener.port, b"GET / HTTP/1.1\r\n\r\n") == []  # outside a frame
    assert not inbox.texts


def test_stop_is_idempotent_and_closes_the_port() -> None:
    listener = MllpListener("127.0.0.1", 0, lambda text, peer: None)
    port = listener.port
    listener.start()
    listener.stop()
    listener.stop()
    with pytest.raises(ConnectionFailedError):
        send_mllp(oru(), "127.0.0.1", port, connect_timeout=2)
    with pytest.raises(RuntimeError):
        listener.start()
    MllpListener("127.0.0.1", 0, lambda text, peer: None).stop()  # never started


# --- build_ack and Hl7Refusal ------------------------------------------------------------------


def test_build_ack() -> None:
    ack = build_ack(oru(), "AA", application="NODE-A", facility="SITE")
    message = strict(ack)
    assert message.msh.msh_3.to_er7() == "NODE-A"
    assert message.msh.msh_4.to_er7() == "SITE"
    assert message.msh.msh_18.to_er7() == "UNICODE UTF-8"
    assert "ERR" not in ack
    refused = build_ack(oru(), "AE", err_code="204", reason="unknown study | accession")
    assert refused.endswith(
        "ERR|||204^Unknown key identifier^HL70357|E||||unknown study \\F\\ accession"
    )
    assert parse_ack(refused).text.startswith("unknown study")
    bare = build_ack("garbage\x0b", "AR", err_code="100")
    strict(bare)
    assert parse_ack(bare).control_id == ""
    assert "ACK^^ACK" in bare


def test_ack_echoes_the_control_id_as_sent() -> None:
    """MSA-2 is the message's MSH-10 (v2.5.1 2.15.8.2): the value, escaped once in the
    ACK's delimiters, whatever delimiters the sender used (MSH-1, MSH-2), so the sender
    matches the ACK to its message; it was escaped a second time (``RIS\\E\\T\\E\\0001``)."""
    ack = build_ack(oru(control="RIS\\T\\0001"), "AA")  # the value RIS&0001
    assert "\rMSA|AA|RIS\\T\\0001\r" in ack + "\r"
    assert strict(ack).msa.msa_2.to_er7() == "RIS\\T\\0001"
    # a sender with other encoding characters: '#' components, '!' escapes
    other = oru(control="A-1").replace("MSH|^~\\&|", "MSH|#~!&|", 1)
    other = other.replace("|A-1|", "|A!T!1!E!2|", 1)  # the value A&1!2
    assert "\rMSA|AA|A\\T\\1!2\r" in build_ack(other, "AA") + "\r"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        build_ack(oru(), "CA")
    with pytest.raises(ValueError):
        build_ack(oru(), "AE")
    with pytest.raises(ValueError):
        build_ack(oru(), "AA", err_code="207")
    with pytest.raises(ValueError):
        Hl7Refusal("AA", "207", "x")
    with pytest.raises(ValueError):
        Hl7Refusal("AE", "E207", "x")
    with pytest.raises(ValueError):
        MllpListener("127.0.0.1", 0, lambda text, peer: None, allowed_hosts=["ris.example"])
