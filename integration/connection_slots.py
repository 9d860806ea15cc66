"""Connection accounting of the DICOM association server, and refusing over its limits.

:class:`ConnectionSlots` counts the connections of
:class:`integration.transport.BoundedAssociationServer`, in all and per source address,
each from accept until its association's thread ends. A connection over a limit gets no
thread: :class:`Rejector` answers its A-ASSOCIATE-RQ with A-ASSOCIATE-RJ
rejected-transient, service-provider (presentation), local-limit-exceeded (PS3.8 9.3.4,
Table 9-21: the answer pynetdicom gives for ``maximum_associations``) from the accept loop,
without ever blocking it, then closes it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from pynetdicom.pdu import A_ASSOCIATE_RJ

from integration.transport_limits import MAX_REQUEST_PDU_SIZE

__all__ = ["ConnectionSlots", "Rejector"]

# A-ASSOCIATE-RJ fields (PS3.8 Table 9-21).
_RJ_TRANSIENT = 0x02
_RJ_SOURCE_PROVIDER_PRESENTATION = 0x03
_RJ_LOCAL_LIMIT_EXCEEDED = 0x02


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
    """A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local limit."""
    rj = A_ASSOCIATE_RJ()
    rj.result = _RJ_TRANSIENT
    rj.source = _RJ_SOURCE_PROVIDER_PRESENTATION
    rj.reason_diagnostic = _RJ_LOCAL_LIMIT_EXCEEDED
    return bytes(rj.encode())


class Rejector:
    """Answers refused connections with A-ASSOCIATE-RJ from the accept loop, never blocking.

    The reject answers the peer's A-ASSOCIATE-RQ, so it goes out once the peer's first bytes
    have arrived (a reject before the request confuses requestors that are still
    connecting); then the node stops sending (FIN) and closes once the peer has closed, so
    that no reset overtakes the reject. :meth:`poll` runs from the accept loop
    (``service_actions``, every poll interval of ``serve_forever``: 0.5 s); each socket is
    dropped after ``patience`` seconds whatever happens, or once it has sent more than an
    A-ASSOCIATE-RQ may have (``MAX_REQUEST_PDU_SIZE``); at most ``capacity`` wait at once
    (more are closed without a reject).

    Parameters
    ----------
    capacity
        Sockets waiting at once.
    patience
        Seconds a socket may wait, in all.
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
