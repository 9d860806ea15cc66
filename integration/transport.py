"""The node SCP's transport: what one peer can make it hold (PS3.8 DICOM Upper Layer).

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer` trusts its peers: it
reads a whole PDU of whatever length the PDU header claims (PS3.8 9.3.1: a 4-byte length, so
up to 4 GiB) into memory before looking at it, keeps a DIMSE message's command set and any
data set but a C-STORE-RQ's in memory however long they grow, counts a bare TCP connection as
an association until the ACSE timeout ends it, blocks with no timeout inside a PDU whose bytes
trickle in, and runs the TLS handshake inside its one accept loop.
:class:`BoundedAssociationServer` keeps pynetdicom's protocol handling and bounds all of it
(:class:`~integration.transport_limits.TransportLimits`), through public hooks only
(pynetdicom's ``AE.make_server(server_class=...)`` and ``request_handler``,
:mod:`socketserver`'s ``verify_request`` / ``process_request_thread``, a
:class:`socket.socket` subclass and :attr:`ssl.SSLContext.sslsocket_class`) plus one private
pynetdicom method, isolated in :meth:`GuardedRequestHandler._create_association`:

- **PDU length before buffering** (:class:`~integration.pdu_framer.PduFramer`): every byte
  pynetdicom receives passes through the connection's
  :class:`~integration.guarded_socket.GuardedSocket`, which follows the PDU boundaries. When a
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
- **Connection slots** (:class:`~integration.connection_slots.ConnectionSlots`): at most
  ``max_connections`` connections in all and ``max_connections_per_address`` from one
  source address, each counted from accept until its association's thread ends (TLS
  handshake and negotiation included). A connection over a limit gets no thread: the accept
  loop answers its A-ASSOCIATE-RQ with A-ASSOCIATE-RJ rejected-transient, service-provider
  (presentation), local-limit-exceeded (PS3.8 9.3.4, the answer pynetdicom gives for
  ``maximum_associations``), without blocking
  (:class:`~integration.connection_slots.Rejector`), then closes it; under TLS it is closed
  without a word.
- **TLS handshake off the accept loop**: the accept loop only accepts; the handshake runs in
  the connection's own thread with an overall deadline (``tls_handshake_timeout``), so
  silent sockets cannot delay other callers' handshakes
  (:func:`~integration.tls_handshake.open_guarded`).

Log lines name the peer by address and port only, and each kind of refusal is logged at most
once per source address every 10 s (with the count of those not logged), so that a flood of
refused connections cannot fill the log (:data:`integration.peers.PEER_WARNINGS`).
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from integration.connection_slots import ConnectionSlots, Rejector
from integration.peers import PEER_WARNINGS, peer_label, source_address
from integration.tls_handshake import guard_tls, open_guarded
from integration.transport_limits import TransportLimits

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.ae import ApplicationEntity
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

__all__ = ["BoundedAssociationServer", "GuardedRequestHandler"]

LOG = logging.getLogger(__name__)


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
    """pynetdicom's threaded association server, keeping :class:`TransportLimits` (PS3.8).

    Use it through ``AE.make_server(address, server_class=BoundedAssociationServer,
    limits=...)`` (``integration.ae.NodeAE`` does). ``ssl_context``'s ``sslsocket_class`` is
    replaced by a :class:`~integration.guarded_socket.GuardedSocket` subclass of it
    (:func:`~integration.tls_handshake.guard_tls`).

    Parameters
    ----------
    ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler
        As for :class:`~pynetdicom.transport.AssociationServer`.
    limits
        The bounds to keep.
    reuse_port
        Set ``SO_REUSEPORT`` on the listening socket before binding it (Linux): several
        processes may then listen on the same address and port, and the kernel spreads new
        connections among them.
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
        reuse_port: bool = False,
    ) -> None:
        self.reuse_port = reuse_port
        self.limits = limits if limits is not None else TransportLimits()
        self.slots = ConnectionSlots(
            self.limits.max_connections, self.limits.max_connections_per_address
        )
        self._rejector = Rejector()
        if ssl_context is not None:
            guard_tls(ssl_context)
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=request_handler or GuardedRequestHandler,
        )

    def server_bind(self) -> None:
        """pynetdicom's bind (``SO_REUSEADDR``), with ``SO_REUSEPORT`` first if asked."""
        if self.reuse_port:
            sock = cast(socket.socket, self.socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    # -- the accept loop: accept, count, refuse; nothing that can block ---------------------

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection (the TLS handshake happens later, in its own thread)."""
        listener = cast(socket.socket, self.socket)
        sock, address = listener.accept()
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection slot, or refuse the connection at once (see module doc)."""
        source = source_address(client_address)
        reason = self.slots.acquire(source)
        if reason is None:
            return True
        PEER_WARNINGS.warn(
            "refused",
            source,
            "connection from %s refused (A-ASSOCIATE-RJ local-limit-exceeded): %s",
            peer_label(client_address),
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
            self.slots.release(source_address(client_address))
            raise

    # -- the connection's own thread ----------------------------------------------------------

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """TLS handshake, PDU guard, then pynetdicom's association; the slot is held until
        the association ends."""
        sock: socket.socket | None = None
        try:
            sock = open_guarded(request, client_address, self.limits, self.ssl_context)
            if sock is not None:
                self.finish_request(sock, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(sock if sock is not None else request)
        finally:
            self.slots.release(source_address(client_address))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an unexpected error of a connection's thread (instead of printing it)."""
        LOG.exception("unexpected error on the connection from %s", peer_label(client_address))
