"""A connected socket that keeps :class:`TransportLimits` on what a DICOM peer sends (PS3.8).

Every byte pynetdicom receives on a connection of
:class:`integration.transport.BoundedAssociationServer` passes through the connection's
:class:`GuardedSocket`, which follows the PDU boundaries (:class:`PduFramer`, PS3.8 9.3.1)
and keeps the deadlines: a PDU must arrive whole within ``pdu_timeout`` of its first byte,
the A-ASSOCIATE-RQ within ``request_timeout`` of the connection. A PDU over its limit, or a
deadline passed, makes the socket send A-ABORT (source service-provider, PS3.8 9.3.8) and
read as closed from then on. Sends time out after ``send_timeout``.

pynetdicom reads a PDU's body 4 KiB at a time; inside a PDU body the socket reads ahead up to
:data:`READ_AHEAD` bytes **of that PDU only** and serves the following reads from them, so
a large P-DATA-TF PDU costs a few system calls instead of one per 4 KiB. Nothing past the
PDU's end is read ahead: when pynetdicom has the whole PDU the buffer is empty, and its
``select`` on the socket (is the next PDU there?) still sees every byte not yet read.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from pynetdicom.pdu import A_ABORT_RQ

from integration.pdu_framer import PduFramer
from integration.peers import PEER_WARNINGS
from integration.transport_limits import TransportLimits

__all__ = ["READ_AHEAD", "GuardedSocket"]

READ_AHEAD = 256 << 10
"""Most bytes of the current PDU's body read by one system call (see the module doc)."""

# A-ABORT source / reason (PS3.8 Table 9-26).
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_REASON_NOT_SPECIFIED = 0x00
_ABORT_INVALID_PARAMETER_VALUE = 0x06


class _Guard:
    """Per-connection state of a :class:`GuardedSocket`: framer, deadlines, peer."""

    __slots__ = (
        "ahead",
        "ahead_at",
        "closed_reason",
        "connected_at",
        "deadline",
        "framer",
        "limits",
        "peer",
        "source",
    )

    def __init__(self, limits: TransportLimits, peer: str, source: str) -> None:
        self.limits = limits
        self.peer = peer
        self.source = source
        self.framer = PduFramer(first_limit=limits.max_request_pdu_size, limit=limits.max_pdu_size)
        self.connected_at = time.monotonic()
        self.deadline: float | None = None
        self.closed_reason: str | None = None
        self.ahead = b""
        """Bytes of the current PDU already received and checked, not yet returned."""
        self.ahead_at = 0
        """How many of :attr:`ahead` were returned."""

    def take_ahead(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes read ahead, or ``b""`` when none are left."""
        start = self.ahead_at
        if start >= len(self.ahead):
            return b""
        end = start + bufsize
        self.ahead_at = end
        data = self.ahead[start:end]
        if end >= len(self.ahead):
            self.ahead, self.ahead_at = b"", 0
        return data

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
    """An A-ABORT PDU (PS3.8 9.3.8), source service-provider, with ``reason`` (Table 9-26)."""
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
        if guard.ahead:
            return guard.take_ahead(bufsize)
        now = time.monotonic()
        remaining = guard.next_deadline(now) - now
        if remaining <= 0:
            self._refuse(guard, guard.timeout_reason(), _ABORT_REASON_NOT_SPECIFIED)
            return b""
        self.settimeout(remaining)
        # inside a PDU body: read ahead, but never past the PDU's end (see the module doc)
        want = max(bufsize, min(guard.framer.body_left, READ_AHEAD)) if not flags else bufsize
        try:
            data = super().recv(want, flags)
        except TimeoutError:
            self._refuse(guard, guard.timeout_reason(), _ABORT_REASON_NOT_SPECIFIED)
            return b""
        reason = guard.received(data)
        if reason is not None:
            self._refuse(guard, reason, _ABORT_INVALID_PARAMETER_VALUE)
            return b""
        if len(data) > bufsize:
            guard.ahead, guard.ahead_at = data, bufsize
            return data[:bufsize]
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        """Send, waiting at most ``send_timeout`` for a peer that does not read."""
        guard = self._pdu_guard
        if guard is not None and guard.closed_reason is None:
            self.settimeout(guard.limits.send_timeout)
        return super().send(data, flags)

    def _refuse(self, guard: _Guard, reason: str, abort_reason: int) -> None:
        guard.closed_reason = reason
        PEER_WARNINGS.warn(
            "closed", guard.source, "closing the connection from %s: %s", guard.peer, reason
        )
        try:
            self.settimeout(1.0)
            self.sendall(_abort_pdu(abort_reason))  # A-ABORT, PS3.8 9.3.8
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)
