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
4. answers with :func:`integration.mllp_ack.build_ack` (v2.5.1 section 2.9, original
   acknowledgment mode).

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
import logging
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from types import TracebackType
from typing import Any

from hl7apy.parser import get_message_info

from integration.hl7_fields import CHARSET_CODECS, MshHeader, cr_segments, read_msh
from integration.mllp import END_BLOCK, START_BLOCK, frame
from integration.mllp_ack import ERROR_TEXTS, build_ack
from integration.peers import canonical_ip

__all__ = ["Hl7Handler", "Hl7Refusal", "MllpListener"]

LOGGER = logging.getLogger(__name__)

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


# --- reading a message ------------------------------------------------------------------------


def _decode(raw: bytes) -> tuple[str, str]:
    """(text, codec): decoded with the MSH-18 character set; UTF-8, else Latin-1."""
    head = raw[:1024].decode("ascii", errors="replace")
    codec = CHARSET_CODECS.get(read_msh(head).charset, "utf-8")
    try:
        return raw.decode(codec), codec
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _msh_problem(text: str) -> tuple[str, str] | None:
    """``(table 0357 code, reason)`` when the MSH cannot be read, else ``None``."""
    normalized = cr_segments(text.lstrip())
    if not normalized.startswith("MSH"):
        return "100", "the first segment is not MSH"
    try:
        get_message_info(normalized)  # hl7apy: MSH-1 / MSH-2 delimiters
    except Exception:
        return "102", "MSH-1/MSH-2 delimiters cannot be read"
    header = read_msh(normalized)
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
        self._allowed = None if allowed_hosts is None else {canonical_ip(h) for h in allowed_hosts}
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
        if self._allowed is None or canonical_ip(peer) in self._allowed:
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
        header = read_msh(text)
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

    def _handle(
        self, text: str, peer: str, header: MshHeader
    ) -> tuple[str, str | None, str | None]:
        """(MSA-1, ERR-3 code, reason) from the handler's outcome."""
        try:
            self._handler(text, peer)
        except Hl7Refusal as refusal:
            return refusal.ack_code, refusal.err_code, refusal.reason
        except Exception as exc:  # its text may quote the message: type name only
            LOGGER.error("MLLP handler failed on %s (%s)", header.control_id, type(exc).__name__)
            return "AE", "207", ERROR_TEXTS["207"]
        return "AA", None, None
