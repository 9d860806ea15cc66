"""A small MLLP listener: receive HL7 v2 messages (e.g. final-report ORU^R01), answer ACKs.

Framing is MLLP release 1 (HL7 v2 appendix C, as IHE ITI TF-2 Appendix C and IHE RAD use
it): ``0x0B`` + message + ``0x1C 0x0D``; the sender waits for one framed ACK per message
and may send the next on the same connection. For each frame the listener:

1. decodes it with the MSH-18 character set (UTF-8 when absent, Latin-1 if that fails);
2. checks the MSH: first segment not MSH -> ``AR`` with ERR-3 ``100`` (segment sequence
   error); MSH-1/MSH-2 delimiters hl7apy cannot read -> ``AR 102`` (data type error);
   empty MSH-9 or MSH-10 -> ``AR 101`` (required field missing);
3. calls the handler: it returns to accept (``AA``) or raises :class:`Hl7Refusal`
   (``AE``/``AR`` with its table 0357 code); any other exception gives ``AE 207``
   (application internal error), logged by type name only;
4. answers with :func:`build_ack` (v2.5.1 section 2.9, original acknowledgment mode).

A peer not in ``allowed_hosts`` is closed before anything is read. A frame over
``max_message_bytes``, bytes outside a frame, or a frame not complete within ``timeout``
seconds (one deadline per frame: a peer trickling bytes cannot hold a thread) ends the
connection without a reply. Each connection has its own thread: the handler must be
thread-safe.

**Why not hl7apy's MLLPServer**: it answers one message per connection and closes it,
reads byte by byte without a size limit, has only a per-``recv`` timeout, silently drops
frames with LF segment separators or empty segments (its frame regex), and for malformed
messages or types without a handler closes without any ACK unless an error handler is
registered, which gets the exception but not the MSH fields an ACK needs; it has no
allow-list. So this is a :class:`socketserver.ThreadingTCPServer` plus ~100 lines of
framing; hl7apy still reads the MSH delimiters and builds and validates the ACK.

Privacy: log lines carry peer address, byte counts, MSH-9, MSH-10 and ACK codes, never
content; a refusal's reason goes into MSA-3/ERR-8 and must not quote the message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import re
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import get_message_info

from integration.hl7_values import escape, ts
from integration.mllp import END_BLOCK, START_BLOCK, frame

__all__ = ["ERROR_TEXTS", "Hl7Handler", "Hl7Refusal", "MllpListener", "build_ack"]

LOGGER = logging.getLogger(__name__)

VERSION = "2.5.1"
ERROR_TEXTS = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}
"""HL7 table 0357 "Message error condition codes" (v2.5.1): ERR-3 identifier and text."""
_CHARSETS = {
    "": "utf-8",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
}  # HL7 table 0211 (MSH-18) -> Python codec
_MAX_TEXT = 80  # MSA-3 (ST) and ERR-8 (TX) lengths in v2.5.1
_CHUNK = 65536

Hl7Handler = Callable[[str, str], None]
"""``(message text as received (ER7), peer address)``; returns to accept (AA), raises
:class:`Hl7Refusal` to refuse; any other exception gives AE 207."""


class Hl7Refusal(Exception):
    """Raised by an :data:`Hl7Handler` to refuse a message with a negative ACK.

    Parameters
    ----------
    ack_code
        MSA-1 (HL7 table 0008): ``"AE"`` (application error: the content is wrong; the
        same message fails again) or ``"AR"`` (application reject: wrong type, version,
        processing ID, or the receiver cannot take it now).
    err_code
        ERR-3 identifier from HL7 table 0357 (:data:`ERROR_TEXTS`), e.g. ``"101"``
        required field missing, ``"200"`` unsupported message type, ``"204"`` unknown key
        identifier, ``"207"`` application internal error.
    reason
        Short text for MSA-3 and ERR-8; names segments, fields and codes only (no PHI).
    """

    def __init__(self, ack_code: str, err_code: str, reason: str) -> None:
        if ack_code not in ("AE", "AR"):
            raise ValueError(f"ack_code must be AE or AR, got {ack_code!r}")
        if not re.fullmatch(r"\d{1,3}", err_code):
            raise ValueError(f"err_code must be an HL7 table 0357 code, got {err_code!r}")
        super().__init__(f"{ack_code} {err_code}: {reason}")
        self.ack_code = ack_code
        self.err_code = err_code
        self.reason = reason


# --- acknowledgments ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """What could be read of an incoming MSH (values still in the sender's encoding)."""

    sender: str = ""  # MSH-3 (HD), our delimiters
    sender_facility: str = ""  # MSH-4 (HD)
    message_type: str = ""  # MSH-9.1
    event: str = ""  # MSH-9.2
    control_id: str = ""  # MSH-10
    processing_id: str = "P"  # MSH-11.1
    charset: str = ""  # MSH-18


def build_ack(
    incoming_er7: str,
    ack_code: str,
    *,
    err_code: str | None = None,
    reason: str | None = None,
    application: str = "CXR-NODE",
    facility: str = "",
) -> str:
    """Build the HL7 v2.5.1 ACK for a message (HL7 v2.5.1 sections 2.9.2, 2.14.1, 2.15.5).

    Parameters
    ----------
    incoming_er7
        The message acknowledged; whatever of its MSH can be read is used (a message
        without a readable MSH-10 gives an empty MSA-2: there is nothing to echo, and
        a made-up value would mislead the sender; a STRICT parser reports it missing).
    ack_code
        MSA-1 (table 0008): ``"AA"``, ``"AE"`` or ``"AR"``.
    err_code
        ERR-3 identifier (table 0357); required for AE/AR, not allowed with AA.
    reason
        MSA-3 and ERR-8 text (cut to 80 characters, escaped); default the table 0357 text.
    application, facility
        MSH-3 and MSH-4 of the ACK (this node), as ER7 HD values (``namespace`` or
        ``namespace^universal id^type``).

    Returns
    -------
    str
        ``MSH|^~\\&|<application>|<facility>|<incoming MSH-3>|<incoming MSH-4>|<now>||
        ACK^<event>^ACK|<new id>|<incoming MSH-11 or P>|2.5.1`` (+ MSH-18 echoed),
        ``MSA|<code>|<incoming MSH-10>[|<reason>]`` and, for AE/AR,
        ``ERR|||<code>^<text>^HL70357|E||||<reason>``; segments end with CR, no framing.
        Built with hl7apy and validated against its 2.5.1 ACK structure.

    Raises
    ------
    ValueError
        Unknown ``ack_code``, missing or superfluous ``err_code``.
    """
    if ack_code not in ("AA", "AE", "AR"):
        raise ValueError(f"ack_code must be AA, AE or AR, got {ack_code!r}")
    if (ack_code == "AA") != (err_code is None):
        raise ValueError("err_code is required with AE/AR and not allowed with AA")
    header = _read_header(incoming_er7)
    text = None
    if err_code is not None:
        text = escape(_clean(reason or ERROR_TEXTS.get(err_code, "Error"))[:_MAX_TEXT])
    for values in (header, _Header(control_id=header.control_id)):
        try:
            return _ack(values, ack_code, err_code, text, application, facility)
        except Exception as exc:  # an echoed value hl7apy refuses (e.g. longer than ST)
            LOGGER.warning("ACK without some echoed MSH fields (%s)", type(exc).__name__)
    return _ack(_Header(), ack_code, err_code, text, application, facility)


def _ack(
    header: _Header,
    ack_code: str,
    err_code: str | None,
    text: str | None,
    application: str,
    facility: str,
) -> str:
    """The ACK as hl7apy builds it at STRICT validation (see :func:`build_ack`)."""
    ack = Message("ACK", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = ack.msh
    msh.msh_3 = _clean(application)
    if facility:
        msh.msh_4 = _clean(facility)
    if header.sender:
        msh.msh_5 = header.sender
    if header.sender_facility:
        msh.msh_6 = header.sender_facility
    msh.msh_7 = ts(dt.datetime.now(dt.UTC))
    msh.msh_9 = f"ACK^{header.event}^ACK"
    msh.msh_10 = "A" + uuid.uuid4().hex[:19].upper()  # ST, 20 characters in v2.5.1
    msh.msh_11 = header.processing_id
    msh.msh_12 = VERSION
    if header.charset:
        msh.msh_18 = header.charset
    ack.msa.msa_1 = ack_code
    ack.msa.msa_2 = escape(header.control_id)
    if err_code is not None:
        ack.msa.msa_3 = text
        err = ack.add_segment("ERR")
        err.err_3 = f"{err_code}^{escape(ERROR_TEXTS.get(err_code, 'Error'))}^HL70357"
        err.err_4 = "E"  # table 0516: error
        err.err_8 = text
    ack.validate()
    return str(ack.to_er7())


def _read_header(er7: str) -> _Header:
    """Read MSH-3, -4, -9, -10, -11 and -18 by position, tolerating a damaged message."""
    first = re.split(r"[\r\n]+", er7.lstrip("\x0b\r\n \t"), maxsplit=1)[0]
    if not first.startswith("MSH") or len(first) < 8:
        return _Header()
    fields = first.split(first[3])
    component = fields[1][:1] or "^"

    def value(number: int) -> list[str]:
        raw = fields[number - 1] if number - 1 < len(fields) else ""
        return [_clean(part) for part in raw.split(component)]

    def hd(number: int) -> str:  # HD: namespace^universal id^type, in our delimiters
        parts = [re.sub(r"[|^~\\&]", "", part) for part in value(number)[:3]]
        return "^".join(parts).rstrip("^")

    processing = value(11)[0].upper()
    return _Header(
        sender=hd(3),
        sender_facility=hd(4),
        message_type=value(9)[0],
        event=re.sub(r"[^A-Za-z0-9]", "", [*value(9), ""][1])[:3].upper(),
        control_id=value(10)[0],
        processing_id=processing if processing in ("P", "T", "D") else "P",
        charset=value(18)[0] if value(18)[0] in _CHARSETS else "",
    )


def _clean(text: str) -> str:
    """``text`` without control characters (CR, LF, MLLP block bytes), stripped."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


def _decode(raw: bytes) -> tuple[str, str]:
    """(text, codec): decoded with the MSH-18 character set; UTF-8, else Latin-1."""
    head = raw[:1024].decode("ascii", errors="replace")
    codec = _CHARSETS.get(_read_header(head).charset, "utf-8")
    try:
        return raw.decode(codec), codec
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _msh_problem(text: str) -> tuple[str, str] | None:
    """``(table 0357 code, reason)`` when the MSH cannot be read, else ``None``."""
    normalized = re.sub(r"\r\n|\n", "\r", text.lstrip())
    if not normalized.startswith("MSH"):
        return "100", "the first segment is not MSH"
    try:
        get_message_info(normalized)  # hl7apy: MSH-1 / MSH-2 delimiters
    except Exception:
        return "102", "MSH-1/MSH-2 delimiters cannot be read"
    header = _read_header(normalized)
    if not header.message_type:
        return "101", "MSH-9 message type is empty"
    if not header.control_id:
        return "101", "MSH-10 message control ID is empty"
    return None


# --- the listener ------------------------------------------------------------------------------


class _Server(socketserver.ThreadingTCPServer):
    """One thread per connection; the allow-list is checked before a connection is read."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], listener: MllpListener) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.listener = listener
        super().__init__(address, _Connection)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.listener._admits(str(client_address[0]))

    def handle_error(self, request: Any, client_address: Any) -> None:
        failure = type(sys.exc_info()[1]).__name__  # type only: the text may quote data
        LOGGER.error("MLLP connection from %s failed (%s)", client_address[0], failure)


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.listener._serve(self.request, str(self.client_address[0]))


class MllpListener:
    """Receive HL7 v2 messages over MLLP and acknowledge each one (see the module text).

    Parameters
    ----------
    host, port
        Address to listen on (``port=0`` picks a free port; see :attr:`port`). The socket
        is bound here, served by :meth:`start`.
    handler
        Called once per message whose MSH can be read, from the connection's thread.
    allowed_hosts
        Peer IP addresses (text) allowed to connect; ``None`` allows everyone.
    max_message_bytes
        Largest message accepted (between the block characters).
    timeout
        Seconds a connection may take to deliver one whole frame (also the idle time
        allowed between messages).
    application, facility
        MSH-3 and MSH-4 of the ACKs.

    Raises
    ------
    ValueError
        An ``allowed_hosts`` entry that is not an IP address, or limits out of range.
    OSError
        The address cannot be bound (e.g. the port is in use).
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: Hl7Handler,
        *,
        allowed_hosts: Collection[str] | None = None,
        max_message_bytes: int = 1_048_576,
        timeout: float = 30.0,
        application: str = "CXR-NODE",
        facility: str = "",
    ) -> None:
        if max_message_bytes < 8 or timeout <= 0:
            raise ValueError("max_message_bytes must be >= 8 and timeout > 0")
        self._allowed = None if allowed_hosts is None else {_ip(h) for h in allowed_hosts}
        self._handler = handler
        self._max_bytes = max_message_bytes
        self._timeout = timeout
        self._identity = (application, facility)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._server = _Server((host, port), self)

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in a daemon thread (once; a stopped listener cannot start again)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the MLLP listener was stopped")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name=f"mllp-listener-{self.port}",
                daemon=True,
            )
            self._thread.start()
        LOGGER.info("MLLP listener on port %d", self.port)

    def stop(self) -> None:
        """Close the socket and open connections, join the thread (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread, connections = self._thread, list(self._open)
        if thread is not None:
            self._server.shutdown()
        self._server.server_close()
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=10)
        LOGGER.info("MLLP listener on port %d stopped", self.port)

    def __enter__(self) -> MllpListener:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _admits(self, peer: str) -> bool:
        if self._allowed is None or _ip(peer) in self._allowed:
            return True
        LOGGER.warning("MLLP connection from %s refused: not an allowed host", peer)
        return False

    @contextlib.contextmanager
    def _tracked(self, conn: socket.socket) -> Iterator[None]:
        with self._lock:
            self._open.add(conn)
        try:
            yield
        finally:
            with self._lock:
                self._open.discard(conn)

    def _serve(self, conn: socket.socket, peer: str) -> None:
        """Answer each frame of one connection in turn until it ends."""
        buffer = bytearray()
        with self._tracked(conn):
            while True:
                raw = self._read_frame(conn, buffer, peer)
                if raw is None:
                    return
                reply = self._answer(raw, peer)
                try:
                    conn.sendall(reply)
                except OSError as exc:
                    LOGGER.warning("MLLP %s: ACK not sent (%s)", peer, type(exc).__name__)
                    return

    def _read_frame(self, conn: socket.socket, buffer: bytearray, peer: str) -> bytes | None:
        """The next message of the connection, or ``None`` when it is to be dropped."""
        deadline = time.monotonic() + self._timeout
        while True:
            del buffer[: len(buffer) - len(buffer.lstrip(b"\r\n"))]  # LF after a frame
            if buffer and buffer[:1] != START_BLOCK:
                LOGGER.warning("MLLP %s: data outside a frame (no 0x0B); dropped", peer)
                return None
            end = buffer.find(END_BLOCK)
            size = end - 1 if end != -1 else len(buffer) - 2
            if size > self._max_bytes:
                LOGGER.warning("MLLP %s: frame over %d bytes; dropped", peer, self._max_bytes)
                return None
            if end != -1:
                message = bytes(buffer[1:end])
                del buffer[: end + len(END_BLOCK)]
                return message
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                conn.settimeout(remaining)
                chunk = conn.recv(_CHUNK)
            except TimeoutError:
                what = "incomplete frame" if buffer else "idle connection"
                LOGGER.info("MLLP %s: %s after %.1f s; dropped", peer, what, self._timeout)
                return None
            except OSError:
                return None  # reset by the peer, or closed by stop()
            if not chunk:
                if buffer:
                    LOGGER.warning("MLLP %s: closed before the end block", peer)
                return None
            buffer += chunk

    def _answer(self, raw: bytes, peer: str) -> bytes:
        """The framed ACK for one message (see the module text, steps 1-4)."""
        text, codec = _decode(raw)
        header = _read_header(text)
        problem = _msh_problem(text)
        err_code: str | None
        reason: str | None
        if problem is not None:
            ack_code, (err_code, reason) = "AR", problem
            LOGGER.warning("MLLP %s: unreadable MSH (%d bytes): AR %s", peer, len(raw), err_code)
        else:
            ack_code, err_code, reason = self._handle(text, peer, header)
            LOGGER.info(
                "MLLP %s: %s %s (%d bytes) -> %s %s",
                peer,
                header.message_type,
                header.control_id,
                len(raw),
                ack_code,
                err_code or "-",
            )
        application, facility = self._identity
        ack = build_ack(
            text,
            ack_code,
            err_code=err_code,
            reason=reason,
            application=application,
            facility=facility,
        )
        return frame(ack.encode(codec, errors="replace"))

    def _handle(self, text: str, peer: str, header: _Header) -> tuple[str, str | None, str | None]:
        """(MSA-1, ERR-3 code, reason) from the handler's outcome."""
        try:
            self._handler(text, peer)
        except Hl7Refusal as refusal:
            return refusal.ack_code, refusal.err_code, refusal.reason
        except Exception as exc:  # its text may quote the message: type name only
            LOGGER.error("MLLP handler failed on %s (%s)", header.control_id, type(exc).__name__)
            return "AE", "207", ERROR_TEXTS["207"]
        return "AA", None, None


def _ip(host: str) -> str:
    """An IP address in canonical text form; IPv4-mapped IPv6 addresses as IPv4.

    Raises
    ------
    ValueError
        ``host`` is not an IP address.
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
