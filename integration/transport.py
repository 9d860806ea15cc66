"""The node SCP's transport: what one peer can make it hold (PS3.8 DICOM Upper Layer).

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer` trusts its peers: it
reads a whole PDU of whatever length the PDU header claims (PS3.8 9.3.1: a 4-byte length, so
up to 4 GiB) into memory before looking at it, keeps a DIMSE message's command set and any
data set but a C-STORE-RQ's in memory however long they grow, counts a bare TCP connection as
an association until the ACSE timeout ends it, blocks with no timeout inside a PDU whose bytes
trickle in, and runs the TLS handshake inside its one accept loop.
:class:`BoundedAssociationServer` keeps pynetdicom's protocol handling and bounds all of it,
through public hooks only (pynetdicom's
``AE.make_server(server_class=...)`` and ``request_handler``, :mod:`socketserver`'s
``verify_request`` / ``process_request_thread``, a :class:`socket.socket` subclass and
:attr:`ssl.SSLContext.sslsocket_class`) plus one private pynetdicom method, isolated in
:meth:`GuardedRequestHandler._create_association`:

- **PDU length before buffering** (:class:`PduFramer`): every byte pynetdicom receives passes
  through the connection's :class:`GuardedSocket`, which follows the PDU boundaries. When a
  PDU header claims more than its limit, the header is not handed to pynetdicom: the node
  sends A-ABORT (source service-provider, reason invalid-PDU-parameter-value, PS3.8 9.3.8)
  and closes. The first PDU of a connection (the A-ASSOCIATE-RQ, a few KiB in practice) may
  have ``max_request_pdu_size`` bytes (64 KiB), every later one the Maximum Length the node
  advertises in its A-ASSOCIATE-AC (PS3.8 Annex D.1, ``max_pdu_size``), which a conformant
  peer respects when it fragments P-DATA. Inside P-DATA the framer follows the PDV items and
  refuses (A-ABORT) a command set over 64 KiB, or a data set over 1 MiB of any message but a
  C-STORE-RQ (whose data set pynetdicom writes to a file as it arrives).
- **Time inside a PDU**: a PDU must arrive whole within ``pdu_timeout`` of its first byte,
  and the A-ASSOCIATE-RQ within ``request_timeout`` of the connection (the end of the TLS
  handshake under TLS); a peer that trickles bytes is aborted instead of holding a thread.
  Between PDUs pynetdicom's idle timer (``network_timeout``) applies, and each association's
  ARTIM timer (PS3.8 9.1.5, pynetdicom's ACSE timeout) is ``request_timeout``, so a
  connection that never sends its A-ASSOCIATE-RQ is closed after it. Sends time out after
  ``send_timeout``, so a peer that stops reading cannot hold a thread either.
- **Connection slots** (:class:`ConnectionSlots`): at most ``max_connections`` connections in
  all and ``max_connections_per_address`` from one source address, each counted from accept
  until its association's thread ends (TLS handshake and negotiation included). A connection
  over a limit gets no thread: the accept loop answers its A-ASSOCIATE-RQ with A-ASSOCIATE-RJ
  rejected-transient, service-provider (presentation), local-limit-exceeded (PS3.8 9.3.4, the
  answer pynetdicom gives for ``maximum_associations``), without blocking
  (:class:`_Rejector`), then closes it; under TLS it is closed without a word.
- **TLS handshake off the accept loop**: the accept loop only accepts; the handshake runs in
  the connection's own thread with an overall deadline (``tls_handshake_timeout``), so
  silent sockets cannot delay other callers' handshakes.

Log lines name the peer by address and port only, and each kind of refusal is logged at most
once per source address every 10 s (with the count of those not logged), so that a flood of
refused connections cannot fill the log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.ae import ApplicationEntity
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

__all__ = [
    "DEFAULT_MAX_PDU_SIZE",
    "MAX_REQUEST_PDU_SIZE",
    "BoundedAssociationServer",
    "ConnectionSlots",
    "GuardedRequestHandler",
    "GuardedSocket",
    "PduFramer",
    "TransportLimits",
]

LOG = logging.getLogger(__name__)

PDU_HEADER_LENGTH = 6
"""PDU type (1), reserved (1), PDU length (4, big endian): PS3.8 9.3.1."""
DEFAULT_MAX_PDU_SIZE = 1 << 20
"""Maximum Length the node advertises by default (1 MiB)."""
MAX_REQUEST_PDU_SIZE = 64 << 10
"""Limit on the first PDU of a connection (the A-ASSOCIATE-RQ): 64 KiB."""
MIN_PDU_SIZE = 4096
MAX_PDU_SIZE = 16 << 20
MAX_COMMAND_SET = 64 << 10
"""Largest DIMSE command set (a C-STORE-RQ's has a few hundred bytes)."""
MAX_MEMORY_DATA_SET = 1 << 20
"""Largest data set of a message other than C-STORE-RQ (which pynetdicom holds in memory)."""

_P_DATA_TF = 0x04
_PDV_HEADER_LENGTH = 6  # item length (4), presentation context ID (1), control header (1)
_C_STORE_RQ = 0x0001  # (0000,0100) Command Field, PS3.7 Table E.1-1
_NO_DATA_SET = 0x0101  # (0000,0800) Command Data Set Type: no data set

# A-ABORT source / reason (PS3.8 Table 9-26) and A-ASSOCIATE-RJ fields (Table 9-21).
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_REASON_NOT_SPECIFIED = 0x00
_ABORT_INVALID_PARAMETER_VALUE = 0x06
_RJ_TRANSIENT = 0x02
_RJ_SOURCE_PROVIDER_PRESENTATION = 0x03
_RJ_LOCAL_LIMIT_EXCEEDED = 0x02

_LOG_INTERVAL = 10.0  # seconds between two warnings of one kind about one source address


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """The bounds :class:`BoundedAssociationServer` keeps (see the module docstring).

    Parameters
    ----------
    max_pdu_size
        Largest PDU length accepted after the first PDU, in bytes; the node advertises it as
        its Maximum Length (PS3.8 D.1). 4096 to 16 MiB.
    max_request_pdu_size
        Largest first PDU (the A-ASSOCIATE-RQ), in bytes.
    request_timeout
        Seconds from connection (or TLS handshake) to a complete A-ASSOCIATE-RQ; also the
        association's ARTIM timer.
    pdu_timeout
        Seconds a PDU may take from its first byte to its last.
    send_timeout
        Seconds one send may block on a peer that does not read.
    max_connections
        Connections open at once, in all.
    max_connections_per_address
        Connections open at once from one source IP address.
    tls_handshake_timeout
        Seconds a TLS handshake may take, in all.
    """

    max_pdu_size: int = DEFAULT_MAX_PDU_SIZE
    max_request_pdu_size: int = MAX_REQUEST_PDU_SIZE
    request_timeout: float = 5.0
    pdu_timeout: float = 30.0
    send_timeout: float = 60.0
    max_connections: int = 10
    max_connections_per_address: int = 5
    tls_handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not MIN_PDU_SIZE <= self.max_pdu_size <= MAX_PDU_SIZE:
            raise ValueError(
                f"maximum PDU size must be {MIN_PDU_SIZE}..{MAX_PDU_SIZE} bytes, "
                f"got {self.max_pdu_size}"
            )
        if self.max_request_pdu_size < 1024:
            raise ValueError(
                f"maximum A-ASSOCIATE-RQ size must be >= 1024, got {self.max_request_pdu_size}"
            )
        for name in ("request_timeout", "pdu_timeout", "send_timeout", "tls_handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0 seconds")
        if self.max_connections < 1 or self.max_connections_per_address < 1:
            raise ValueError("connection limits must be at least 1")


class _Warnings:
    """Warnings about peers, at most one per kind and source address every ``interval`` s.

    A hostile peer can make a refusal per connection; the log (and its disk) must not grow
    with them. Suppressed lines are counted in the next one. Thread-safe.
    """

    def __init__(self, interval: float = _LOG_INTERVAL, capacity: int = 1024) -> None:
        self.interval = interval
        self.capacity = capacity
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warn(self, kind: str, source: str, message: str, *args: object) -> None:
        """Log ``message % args`` at WARNING unless ``kind`` from ``source`` was just logged."""
        now = time.monotonic()
        key = (kind, source)
        with self._lock:
            last, suppressed = self._last.get(key, (now - 2 * self.interval, 0))
            if now - last < self.interval:
                self._last[key] = (last, suppressed + 1)
                return
            if len(self._last) >= self.capacity:
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
            self._last[key] = (now, 0)
        if suppressed:
            message += " (%d more like it from this address not logged)"
            args = (*args, suppressed)
        LOG.warning(message, *args)


_WARNINGS = _Warnings()


class PduFramer:
    """Follows the PDUs of a received byte stream and checks what pynetdicom would buffer.

    Every PDU starts with a 6-byte header: type, reserved, 32-bit big-endian length of the
    rest (PS3.8 9.3.1). The framer is fed the bytes in the order they arrive, in chunks of any
    size, and says why the stream must be refused when:

    - a PDU header claims more than its limit: the first PDU of the connection (the
      A-ASSOCIATE-RQ) ``first_limit``, every later one ``limit`` (pynetdicom reads a whole
      PDU into memory before decoding it);
    - inside P-DATA-TF PDUs (PS3.8 9.3.5: PDV items of length, presentation context ID,
      message control header and fragment, Annex E.2), a DIMSE message would pile up in
      memory: pynetdicom keeps a message's command set, and the data set of every message
      but a C-STORE-RQ (whose data set goes to a file fragment by fragment), in memory until
      the message's last fragment. The command set may have ``max_command_set`` bytes, such
      a data set ``max_memory_data_set``;
    - a PDV item does not fit in its PDU (malformed).

    Parameters
    ----------
    first_limit
        Largest length of the first PDU (the A-ASSOCIATE-RQ).
    limit
        Largest length of every later PDU (the Maximum Length, PS3.8 D.1).
    max_command_set
        Largest command set of one DIMSE message.
    max_memory_data_set
        Largest data set of a DIMSE message other than C-STORE-RQ.
    """

    __slots__ = (
        "_body_left",
        "_command",
        "_data_set",
        "_first_limit",
        "_header",
        "_item_header",
        "_item_left",
        "_limit",
        "_max_command",
        "_max_data_set",
        "_mch",
        "_message",
        "_pdu_type",
        "headers",
        "started",
    )

    def __init__(
        self,
        *,
        first_limit: int,
        limit: int,
        max_command_set: int = MAX_COMMAND_SET,
        max_memory_data_set: int = MAX_MEMORY_DATA_SET,
    ) -> None:
        self._first_limit = first_limit
        self._limit = limit
        self._max_command = max_command_set
        self._max_data_set = max_memory_data_set
        self._header = bytearray()
        self._body_left = 0
        self._pdu_type = 0
        self._item_header = bytearray()
        self._item_left = 0
        self._mch = 0
        self._command = bytearray()
        self._message: int | None = None  # Command Field once the command set is complete
        self._data_set = 0  # data set bytes of the current message held in memory
        self.headers = 0
        """PDU headers read in full."""
        self.started = 0
        """PDUs whose first byte has arrived."""

    @property
    def in_pdu(self) -> bool:
        """Whether the stream is inside a PDU (its header or body is incomplete)."""
        return bool(self._header) or self._body_left > 0

    def feed(self, data: bytes | bytearray | memoryview) -> str | None:
        """Account for ``data``, the next bytes of the stream.

        Returns
        -------
        str or None
            Why the stream must be refused, else ``None``.
        """
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._body_left:
                step = min(self._body_left, n - i)
                if self._pdu_type == _P_DATA_TF:
                    reason = self._pdvs(view[i : i + step])
                    if reason is not None:
                        return reason
                self._body_left -= step
                i += step
                if not self._body_left and self._item_header:
                    return "malformed P-DATA-TF PDU: it ends inside a PDV item header"
                continue
            if not self._header:
                self.started += 1
            take = view[i : i + PDU_HEADER_LENGTH - len(self._header)]
            self._header += take
            i += len(take)
            if len(self._header) < PDU_HEADER_LENGTH:
                break
            pdu_type = self._header[0]
            length = int.from_bytes(self._header[2:6], "big")
            self._header.clear()
            first = self.headers == 0
            self.headers += 1
            limit = self._first_limit if first else self._limit
            if length > limit:
                what = "first PDU (A-ASSOCIATE-RQ)" if first else "PDU"
                return (
                    f"{what} of type 0x{pdu_type:02X} claims {length} bytes, "
                    f"above the limit of {limit}"
                )
            self._pdu_type = pdu_type
            self._body_left = length
        return None

    def _pdvs(self, view: memoryview) -> str | None:
        """Follow the PDV items in ``view``, bytes of the current P-DATA-TF PDU's body."""
        i, n = 0, len(view)
        while i < n:
            if self._item_left:
                step = min(self._item_left, n - i)
                reason = self._fragment(view[i : i + step])
                if reason is not None:
                    return reason
                self._item_left -= step
                i += step
                if not self._item_left:
                    self._fragment_end()
                continue
            take = view[i : i + _PDV_HEADER_LENGTH - len(self._item_header)]
            self._item_header += take
            i += len(take)
            if len(self._item_header) < _PDV_HEADER_LENGTH:
                break
            length = int.from_bytes(self._item_header[:4], "big")
            self._mch = self._item_header[5]
            self._item_header.clear()
            if length < 2 or length - 2 > self._body_left - i:
                return f"malformed PDV item: length {length} does not fit its P-DATA-TF PDU"
            self._item_left = length - 2
            if not self._item_left:
                self._fragment_end()
        return None

    def _fragment(self, chunk: memoryview) -> str | None:
        if self._mch & 0x01:  # command information (PS3.8 E.2)
            if len(self._command) + len(chunk) > self._max_command:
                return f"DIMSE command set of more than {self._max_command} bytes"
            self._command += chunk
        elif self._message != _C_STORE_RQ:  # pynetdicom keeps this data set in memory
            self._data_set += len(chunk)
            if self._data_set > self._max_data_set:
                if self._message is None:
                    what = "a data set sent before its command set"
                elif self._message < 0:
                    what = "the data set of a message whose command set has no Command Field"
                else:
                    what = f"the data set of a message with Command Field 0x{self._message:04X}"
                return (
                    f"{what} grows over {self._max_data_set} bytes; only a C-STORE-RQ may "
                    "carry a large data set"
                )
        return None

    def _fragment_end(self) -> None:
        if not self._mch & 0x02:  # not the last fragment
            return
        if self._mch & 0x01:  # the command set is complete
            field, data_set_type = _command_fields(bytes(self._command))
            self._command.clear()
            self._message = field if field is not None else -1
            if data_set_type == _NO_DATA_SET:
                self._end_message()
        else:  # the data set is complete: so is the message
            self._end_message()

    def _end_message(self) -> None:
        self._message = None
        self._data_set = 0


def _command_fields(command: bytes) -> tuple[int | None, int | None]:
    """(0000,0100) Command Field and (0000,0800) Command Data Set Type of a command set.

    A command set is encoded Implicit VR Little Endian (PS3.7 6.3.1): tag, 4-byte length,
    value. ``None`` for what is absent or malformed (pynetdicom then refuses the message).
    """
    field: int | None = None
    data_set_type: int | None = None
    i, n = 0, len(command)
    while i + 8 <= n:
        group, element, length = struct.unpack_from("<HHL", command, i)
        i += 8
        if i + length > n:
            break
        if group == 0x0000 and length == 2:
            value = int.from_bytes(command[i : i + 2], "little")
            if element == 0x0100:
                field = value
            elif element == 0x0800:
                data_set_type = value
        i += length
    return field, data_set_type


class _Guard:
    """Per-connection state of a :class:`GuardedSocket`: framer, deadlines, peer."""

    __slots__ = ("closed_reason", "connected_at", "deadline", "framer", "limits", "peer", "source")

    def __init__(self, limits: TransportLimits, peer: str, source: str) -> None:
        self.limits = limits
        self.peer = peer
        self.source = source
        self.framer = PduFramer(first_limit=limits.max_request_pdu_size, limit=limits.max_pdu_size)
        self.connected_at = time.monotonic()
        self.deadline: float | None = None
        self.closed_reason: str | None = None

    @property
    def on_first_pdu(self) -> bool:
        """Whether the PDU being read, or about to be, is the connection's first."""
        started = self.framer.started
        return started == 0 or (started == 1 and self.framer.in_pdu)

    def next_deadline(self, now: float) -> float:
        """The deadline of the read about to happen (starting a PDU's deadline if needed)."""
        if self.deadline is None:
            self.deadline = now + self.limits.pdu_timeout
            if self.on_first_pdu:  # the A-ASSOCIATE-RQ: counted from the connection
                self.deadline = min(self.deadline, self.connected_at + self.limits.request_timeout)
        return self.deadline

    def timeout_reason(self) -> str:
        """Why a deadline passed, for the log."""
        if self.on_first_pdu:
            return (
                f"no complete A-ASSOCIATE-RQ within {self.limits.request_timeout:g} s "
                "of the connection"
            )
        return f"PDU not complete within {self.limits.pdu_timeout:g} s of its first byte"

    def received(self, data: bytes) -> str | None:
        """Feed ``data``; restart or clear the PDU deadline; say why to refuse, if so."""
        framer = self.framer
        started, in_pdu = framer.started, framer.in_pdu
        reason = framer.feed(data)
        if not framer.in_pdu:
            self.deadline = None
        elif framer.started - started > (0 if in_pdu else 1):
            # the chunk ended the PDU the deadline was for and began another
            self.deadline = time.monotonic() + self.limits.pdu_timeout
        return reason


def _abort_pdu(reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = _ABORT_SOURCE_PROVIDER
    pdu.reason_diagnostic = reason
    return bytes(pdu.encode())


class GuardedSocket(socket.socket):
    """A connected TCP socket that keeps :class:`TransportLimits` on what it receives.

    :meth:`recv` follows PDU boundaries (:class:`PduFramer`) and gives each read the time left
    before its PDU's deadline. A PDU over its limit, or a deadline passed, makes the socket
    send A-ABORT, shut down and from then on read as closed (``b""``), which pynetdicom's DUL
    handles as a closed transport connection (Evt17, PS3.8 9.2). Without :meth:`install` it
    is a plain socket.
    """

    _pdu_guard: _Guard | None = None

    def install(self, limits: TransportLimits, peer: str, source: str | None = None) -> None:
        """Start keeping ``limits`` (call once, right after accept or the TLS handshake).

        ``peer`` names the peer in log lines (``address:port``); ``source`` is its address,
        the key of the log's rate limit (default: ``peer``).
        """
        self._pdu_guard = _Guard(limits, peer, source if source is not None else peer)
        self.settimeout(limits.send_timeout)

    @property
    def closed_reason(self) -> str | None:
        """Why the node closed this connection, or ``None``."""
        return self._pdu_guard.closed_reason if self._pdu_guard is not None else None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Receive at most ``bufsize`` bytes, within the PDU's deadline (see class doc)."""
        guard = self._pdu_guard
        if guard is None:
            return super().recv(bufsize, flags)
        if guard.closed_reason is not None:
            return b""
        now = time.monotonic()
        remaining = guard.next_deadline(now) - now
        if remaining <= 0:
            self._refuse(guard, guard.timeout_reason(), _ABORT_REASON_NOT_SPECIFIED)
            return b""
        self.settimeout(remaining)
        try:
            data = super().recv(bufsize, flags)
        except TimeoutError:
            self._refuse(guard, guard.timeout_reason(), _ABORT_REASON_NOT_SPECIFIED)
            return b""
        reason = guard.received(data)
        if reason is not None:
            self._refuse(guard, reason, _ABORT_INVALID_PARAMETER_VALUE)
            return b""
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        """Send, waiting at most ``send_timeout`` for a peer that does not read."""
        guard = self._pdu_guard
        if guard is not None and guard.closed_reason is None:
            self.settimeout(guard.limits.send_timeout)
        return super().send(data, flags)

    def _refuse(self, guard: _Guard, reason: str, abort_reason: int) -> None:
        guard.closed_reason = reason
        _WARNINGS.warn(
            "closed", guard.source, "closing the connection from %s: %s", guard.peer, reason
        )
        try:
            self.settimeout(1.0)
            self.sendall(_abort_pdu(abort_reason))  # A-ABORT, PS3.8 9.3.8
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)


class GuardedSSLSocket(GuardedSocket, ssl.SSLSocket):  # type: ignore[misc]
    """:class:`GuardedSocket` over TLS (set as the server context's ``sslsocket_class``).

    ``recv(bufsize, flags)`` and ``send(data, flags)`` override :class:`ssl.SSLSocket`'s
    (``recv(buflen=1024, flags=0)``); pynetdicom passes the size positionally.
    """


def _guard_tls(context: ssl.SSLContext) -> None:
    """Make ``context.wrap_socket`` return :class:`GuardedSocket` TLS sockets."""
    current = context.sslsocket_class
    if issubclass(current, GuardedSocket):
        return
    if current is ssl.SSLSocket:
        context.sslsocket_class = GuardedSSLSocket
    else:  # keep a custom SSLSocket subclass's behaviour
        context.sslsocket_class = type(f"Guarded{current.__name__}", (GuardedSocket, current), {})


def _source_address(client_address: Any) -> str:
    """The source IP of ``client_address`` (an IPv4-mapped IPv6 address as IPv4)."""
    host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _peer(client_address: Any) -> str:
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return f"{_source_address(client_address)}:{client_address[1]}"
    return _source_address(client_address)


class ConnectionSlots:
    """Counts open connections, in all and per source address, under one lock.

    Parameters
    ----------
    total
        Connections allowed at once.
    per_address
        Connections allowed at once from one source address.
    """

    def __init__(self, total: int, per_address: int) -> None:
        if total < 1 or per_address < 1:
            raise ValueError("connection limits must be at least 1")
        self.total = total
        self.per_address = min(per_address, total)
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._count = 0

    def acquire(self, address: str) -> str | None:
        """Take a slot for ``address``; return why not when a limit is reached, else ``None``."""
        with self._lock:
            held = self._open.get(address, 0)
            if held >= self.per_address:
                return f"{held} connections open from this address (limit {self.per_address})"
            if self._count >= self.total:
                return f"{self._count} connections open (limit {self.total})"
            self._open[address] = held + 1
            self._count += 1
            return None

    def release(self, address: str) -> None:
        """Give back a slot of ``address``."""
        with self._lock:
            held = self._open.get(address, 0)
            if held <= 0:
                return
            if held == 1:
                del self._open[address]
            else:
                self._open[address] = held - 1
            self._count -= 1

    def open_connections(self, address: str | None = None) -> int:
        """Connections open now, from ``address`` or in all."""
        with self._lock:
            return self._count if address is None else self._open.get(address, 0)


def _reject_pdu() -> bytes:
    rj = A_ASSOCIATE_RJ()
    rj.result = _RJ_TRANSIENT
    rj.source = _RJ_SOURCE_PROVIDER_PRESENTATION
    rj.reason_diagnostic = _RJ_LOCAL_LIMIT_EXCEEDED
    return bytes(rj.encode())


class _Rejector:
    """Answers refused connections with A-ASSOCIATE-RJ from the accept loop, never blocking.

    The reject answers the peer's A-ASSOCIATE-RQ, so it goes out once the peer's first bytes
    have arrived (a reject before the request confuses requestors that are still
    connecting); then the node stops sending (FIN) and closes once the peer has closed, so
    that no reset overtakes the reject. :meth:`poll` runs from the accept loop
    (``service_actions``, every poll interval of ``serve_forever``: 0.5 s); each socket is
    dropped after ``patience`` seconds whatever happens, or once it has sent more than an
    A-ASSOCIATE-RQ may have (``MAX_REQUEST_PDU_SIZE``); at most ``capacity`` wait at once
    (more are closed without a reject).
    """

    def __init__(self, *, capacity: int = 64, patience: float = 2.0) -> None:
        self.capacity = capacity
        self.patience = patience
        self._pending: list[tuple[socket.socket, float, int, bool]] = []
        self._pdu = _reject_pdu()

    def add(self, sock: socket.socket) -> bool:
        """Take ``sock`` over (``True``), or leave it to the caller to close (``False``)."""
        if len(self._pending) >= self.capacity:
            return False
        try:
            sock.setblocking(False)
            kept = socket.socket(fileno=sock.detach())
        except OSError:
            return False
        self._pending.append((kept, time.monotonic() + self.patience, 0, False))
        self.poll()
        return True

    def poll(self) -> None:
        """Read, answer and close what is due, without blocking."""
        now = time.monotonic()
        still: list[tuple[socket.socket, float, int, bool]] = []
        for sock, deadline, received, answered in self._pending:
            got, closed = self._drain(sock)
            received += got
            if received and not answered:
                with contextlib.suppress(OSError):
                    sock.send(self._pdu)
                    sock.shutdown(socket.SHUT_WR)
                answered = True
            if closed or now >= deadline or received > MAX_REQUEST_PDU_SIZE:
                sock.close()
            else:
                still.append((sock, deadline, received, answered))
        self._pending = still

    @staticmethod
    def _drain(sock: socket.socket) -> tuple[int, bool]:
        """Read what is there (at most 128 KiB): (bytes read, whether the peer has closed)."""
        got = 0
        try:
            for _ in range(2):
                chunk = sock.recv(65536)
                if not chunk:
                    return got, True
                got += len(chunk)
        except (BlockingIOError, InterruptedError):
            return got, False
        except OSError:
            return got, True
        return got, False

    def close(self) -> None:
        """Close every socket still waiting."""
        for sock, *_ in self._pending:
            sock.close()
        self._pending = []


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's connection handler, plus two things for :class:`BoundedAssociationServer`.

    The association's ACSE timeout, which pynetdicom uses as the ARTIM timer (PS3.8 9.1.5:
    how long a connection may stay without an A-ASSOCIATE-RQ), is the server's
    ``request_timeout``; and :meth:`handle` returns only when the association's thread ends,
    so that the connection's slot is held exactly as long as the association.
    """

    association: Association | None = None

    def _create_association(self) -> Association:
        # The one private pynetdicom API this module uses: RequestHandler.handle() calls
        # _create_association() to build the acceptor Association of the connection, then
        # starts it. Extending it (rather than copying handle()) leaves everything else to
        # pynetdicom; tests/ingest/test_hostile_peers.py fails if pynetdicom stops calling it.
        assoc = super()._create_association()
        assoc.acse_timeout = cast(BoundedAssociationServer, self.server).limits.request_timeout
        self.association = assoc
        return assoc

    def handle(self) -> None:
        """Start the association (pynetdicom) and wait until its thread has ended."""
        super().handle()
        if self.association is None:
            raise RuntimeError(
                "pynetdicom's RequestHandler.handle() no longer calls _create_association(); "
                "integration/transport.py must follow it"
            )
        self.association.join()


class BoundedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, with :class:`TransportLimits` kept.

    Use it through ``AE.make_server(address, server_class=BoundedAssociationServer,
    limits=...)`` (``integration.ae.NodeAE`` does). ``ssl_context``'s ``sslsocket_class`` is
    replaced by a :class:`GuardedSocket` subclass of it.

    Parameters
    ----------
    ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler
        As for :class:`~pynetdicom.transport.AssociationServer`.
    limits
        The bounds to keep.
    """

    daemon_threads = True  # a connection's thread lives as long as its association
    request_queue_size = 128  # listen backlog: a flood must not make the kernel drop SYNs

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        request_handler: Any = None,
        *,
        limits: TransportLimits | None = None,
    ) -> None:
        self.limits = limits if limits is not None else TransportLimits()
        self.slots = ConnectionSlots(
            self.limits.max_connections, self.limits.max_connections_per_address
        )
        self._rejector = _Rejector()
        if ssl_context is not None:
            _guard_tls(ssl_context)
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=request_handler or GuardedRequestHandler,
        )

    # -- the accept loop: accept, count, refuse; nothing that can block ---------------------

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection (the TLS handshake happens later, in its own thread)."""
        listener = cast(socket.socket, self.socket)
        sock, address = listener.accept()
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection slot, or refuse the connection at once (see module doc)."""
        source = _source_address(client_address)
        reason = self.slots.acquire(source)
        if reason is None:
            return True
        _WARNINGS.warn(
            "refused",
            source,
            "connection from %s refused (A-ASSOCIATE-RJ local-limit-exceeded): %s",
            _peer(client_address),
            reason,
        )
        if self.ssl_context is None:  # under TLS the reject would be plaintext: just close
            self._rejector.add(request)
        return False  # socketserver then closes the socket (unless the rejector took it)

    def service_actions(self) -> None:
        """pynetdicom's housekeeping, then answer refused connections (accept loop)."""
        super().service_actions()
        self._rejector.poll()

    def server_close(self) -> None:
        """Close the listening socket and the refused connections still waiting."""
        super().server_close()
        self._rejector.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread; give the slot back if it cannot start."""
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release(_source_address(client_address))
            raise

    # -- the connection's own thread ----------------------------------------------------------

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """TLS handshake, PDU guard, then pynetdicom's association; the slot is held until
        the association ends."""
        sock: socket.socket | None = None
        try:
            sock = self._open(request, client_address)
            if sock is not None:
                self.finish_request(sock, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(sock if sock is not None else request)
        finally:
            self.slots.release(_source_address(client_address))

    def _open(self, request: socket.socket, client_address: Any) -> GuardedSocket | None:
        peer = _peer(client_address)
        if self.ssl_context is None:
            sock = GuardedSocket(fileno=request.detach())
        else:
            request.settimeout(self.limits.tls_handshake_timeout)  # overall, see ssl docs
            try:
                wrapped = self.ssl_context.wrap_socket(request, server_side=True)
            except OSError as exc:  # ssl.SSLError, the handshake timeout, resets
                _WARNINGS.warn(
                    "tls",
                    _source_address(client_address),
                    "TLS handshake with %s failed: %s",
                    peer,
                    exc,
                )
                request.close()
                return None
            if not isinstance(wrapped, GuardedSocket):
                wrapped.close()
                raise RuntimeError("the server's SSL context no longer makes guarded sockets")
            sock = wrapped
        sock.install(self.limits, peer, _source_address(client_address))
        return sock

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an unexpected error of a connection's thread (instead of printing it)."""
        LOG.exception("unexpected error on the connection from %s", _peer(client_address))
