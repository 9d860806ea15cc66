"""The one place that builds the node's Application Entity (pynetdicom).

:func:`build_storage_ae` returns an AE that

- accepts the Verification SOP Class and every storage SOP Class with every transfer
  syntax (the tables in :mod:`integration.conformance`);
- refuses an association whose Called AE Title is not the node's (A-ASSOCIATE-RJ
  rejected-permanent / service-user / called-AE-title-not-recognised, PS3.8 9.3.4);
- when an allow-list is configured, refuses a calling AE title that is not on it or that
  comes from another source address (rejected-permanent / service-user /
  calling-AE-title-not-recognised), from an ``EVT_REQUESTED`` handler that the AE binds
  itself on every :meth:`NodeAE.start_server`, so a caller cannot forget it;
- receives C-STORE data sets in chunks straight to a file
  (``pynetdicom._config.STORE_RECV_CHUNKED_DATASET``), which the handler renames into the
  spool;
- serves through :class:`integration.transport.BoundedAssociationServer` (from
  :meth:`NodeAE.make_server`, which pynetdicom's ``start_server`` calls): it advertises a
  finite Maximum Length (PS3.8 D.1) and refuses larger PDUs before reading them, bounds the
  time of each PDU, of the A-ASSOCIATE-RQ and of the TLS handshake (in the connection's own
  thread), and limits the connections open at once, in all and per source address. With
  P-DATA bounded to ``maximum_pdu_size``, an association holds a few times that in memory,
  whatever the size of the instance it sends;
- with an :class:`~integration.association_log.AssociationLog`, records every association
  in the receive log (accepted, rejected with its reason, released or aborted) through an
  :class:`~integration.association_log.AssociationRecorder` that :meth:`NodeAE.start_server`
  binds as well (PS3.8 7.1-7.4, 9.3.4).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from integration.association_log import AssociationLog, AssociationRecorder
from integration.conformance import STORAGE_SCP, VERIFICATION_SCP
from integration.transport import BoundedAssociationServer
from integration.transport_limits import DEFAULT_MAX_PDU_SIZE, TransportLimits

__all__ = [
    "AccessPolicy",
    "AllowedCaller",
    "CallerRule",
    "NodeAE",
    "build_storage_ae",
    "enable_chunked_receive",
]

LOG = logging.getLogger(__name__)

# A-ASSOCIATE-RJ parameters (PS3.8 Table 9-21).
RJ_PERMANENT = 0x01
RJ_SOURCE_SERVICE_USER = 0x01
RJ_CALLING_AE_NOT_RECOGNISED = 0x03


@runtime_checkable
class AllowedCaller(Protocol):
    """Anything with an AE title and an optional source host (e.g. node settings' AllowedAE)."""

    @property
    def ae_title(self) -> str: ...

    @property
    def host(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class CallerRule:
    """One allowed calling AE: a title and, optionally, the addresses it may come from.

    Parameters
    ----------
    ae_title
        Calling AE Title (PS3.5 VR AE, at most 16 characters; compared without padding).
    networks
        Source networks allowed for this title; empty means any address.
    """

    ae_title: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __post_init__(self) -> None:
        title = self.ae_title.strip()
        if not title or len(title) > 16 or "\\" in title:
            raise ValueError(f"Calling AE Title {self.ae_title!r} is not a valid AE title (VR AE)")
        object.__setattr__(self, "ae_title", title)

    @classmethod
    def parse(cls, spec: str | AllowedCaller) -> CallerRule:
        """Build a rule from ``"AET"``, ``"AET@host"`` (IP, CIDR or host name) or an object.

        A host name is resolved once, here; an IP address or network is used as given.
        """
        if isinstance(spec, str):
            title, sep, host = spec.strip().partition("@")
            host_or_none: str | None = host if sep and host else None
        else:
            title, host_or_none = spec.ae_title, spec.host
        if not host_or_none:
            return cls(ae_title=title)
        return cls(ae_title=title, networks=_networks(host_or_none))

    def matches_address(self, address: str) -> bool:
        """Whether ``address`` (the peer's IP) is allowed for this title."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


def _networks(host: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    host = host.strip().strip("[]")
    try:
        return (ipaddress.ip_network(host, strict=False),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ValueError(f"allowed calling AE host {host!r} does not resolve: {exc}") from exc
    addresses = dict.fromkeys(str(info[4][0]) for info in infos)
    return tuple(ipaddress.ip_network(a) for a in addresses)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Which callers may associate (PS3.8 9.3.4 A-ASSOCIATE-RJ when not).

    Parameters
    ----------
    rules
        Allowed calling AEs; empty means any calling AE title from any address.
    """

    rules: tuple[CallerRule, ...] = ()

    def refusal(self, calling_ae: str, address: str) -> str | None:
        """Why ``calling_ae`` at ``address`` is refused, or ``None`` when it is allowed."""
        if not self.rules:
            return None
        title = calling_ae.strip()
        same_title = [r for r in self.rules if r.ae_title == title]
        if not same_title:
            return "calling AE title not on the allow-list"
        if not any(r.matches_address(address) for r in same_title):
            return "calling AE title not allowed from this source address"
        return None


def _check_requestor(
    event: Event, policy: AccessPolicy, recorder: AssociationRecorder | None = None
) -> None:
    """``EVT_REQUESTED`` handler: send A-ASSOCIATE-RJ to callers the policy refuses (and
    tell the receive log's ``recorder`` why, PS3.8 9.3.4)."""
    assoc = event.assoc
    try:
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
        address = str(assoc.requestor.address)
        reason = policy.refusal(calling, address)
        if reason is None:
            return
        LOG.warning(
            "association refused: %s (calling AE %r from %s:%s, called AE %r)",
            reason,
            calling,
            address,
            assoc.requestor.port,
            str(primitive.called_ae_title if primitive is not None else "").strip(),
        )
        if recorder is not None:
            recorder.rejected(assoc, reason)
        assoc.acse.send_reject(RJ_PERMANENT, RJ_SOURCE_SERVICE_USER, RJ_CALLING_AE_NOT_RECOGNISED)
        # As pynetdicom does for its own rejections: wait for the peer to close, then stop.
        assoc.kill()
    except Exception:  # never let a handler raise into pynetdicom's reactor
        LOG.exception("association access check failed; aborting the association")
        assoc.abort()


def _no_delay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle so small C-STORE responses go out at once."""
    try:
        sock = event.assoc.dul.socket
        raw = getattr(sock, "socket", None)
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not fatal: only latency
        LOG.debug("could not set TCP_NODELAY", exc_info=True)


class NodeAE(AE):
    """An :class:`~pynetdicom.ae.ApplicationEntity` that enforces its :class:`AccessPolicy`
    and its :class:`~integration.transport_limits.TransportLimits`.

    :meth:`start_server` binds the policy's ``EVT_REQUESTED`` handler before any handler the
    caller passes, so every server this AE starts refuses unknown callers; every server is a
    :class:`~integration.transport.BoundedAssociationServer` (:meth:`make_server`). With an
    ``association_recorder``, every server feeds the receive log too; the C-STORE handler
    finds the recorder here (:func:`integration.scp.handle_store`). With ``reuse_port``,
    every server's listening socket has ``SO_REUSEPORT``, so several processes may listen on
    one port and the kernel spreads the connections among them.
    """

    def __init__(
        self,
        ae_title: str,
        *,
        policy: AccessPolicy,
        ssl_context: ssl.SSLContext | None = None,
        limits: TransportLimits | None = None,
        association_recorder: AssociationRecorder | None = None,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(ae_title=ae_title)
        self.reuse_port = reuse_port
        self.policy = policy
        self.association_recorder = association_recorder
        self.ssl_context = ssl_context
        self.limits = limits if limits is not None else TransportLimits()

    def server_limits(self) -> TransportLimits:
        """:attr:`limits`, with the AE's ``maximum_pdu_size`` and ``maximum_associations``.

        pynetdicom's two knobs stay the ones that count: the Maximum Length the association
        advertises is ``maximum_pdu_size``, so the PDU guard must use the same value.

        Raises
        ------
        ValueError
            ``maximum_pdu_size`` is 0 (unlimited) or outside 4096..16 MiB.
        """
        return replace(
            self.limits,
            max_pdu_size=self.maximum_pdu_size,
            max_connections=self.maximum_associations,
        )

    def make_server(  # type: ignore[override]
        self,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str | None = None,
        contexts: list[Any] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        server_class: type[Any] | None = None,
        **kwargs: Any,
    ) -> BoundedAssociationServer:
        """Build a :class:`~integration.transport.BoundedAssociationServer` (pynetdicom's
        documented hook for a custom server class; ``start_server`` calls it)."""
        if server_class is None or not issubclass(server_class, BoundedAssociationServer):
            server_class = BoundedAssociationServer
        kwargs.setdefault("limits", self.server_limits())
        kwargs.setdefault("reuse_port", self.reuse_port)
        server = super().make_server(
            address,
            ae_title=ae_title,
            contexts=contexts,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            server_class=server_class,
            **kwargs,
        )
        return server  # type: ignore[return-value]

    def start_server(  # type: ignore[override]
        self,
        address: tuple[str, int] | tuple[str, int, int, int],
        block: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        ae_title: str | None = None,
        contexts: list[Any] | None = None,
    ) -> ThreadedAssociationServer | None:
        """Start the SCP with the access check bound (see pynetdicom ``AE.start_server``).

        ``ssl_context`` defaults to the one given to :func:`build_storage_ae`.
        """
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, _no_delay),
            (evt.EVT_REQUESTED, _check_requestor, [self.policy, self.association_recorder]),
        ]
        if self.association_recorder is not None:
            handlers += self.association_recorder.handlers()
        handlers += list(evt_handlers or [])
        return super().start_server(
            address,
            block=block,
            ssl_context=ssl_context if ssl_context is not None else self.ssl_context,
            evt_handlers=handlers,
            ae_title=ae_title,
            contexts=contexts,
        )


def enable_chunked_receive() -> None:
    """Make pynetdicom write each received C-STORE data set to a file (``dataset_path``).

    A process-wide pynetdicom setting; the node's receive path needs it for speed and
    memory: each P-DATA fragment goes to the file as it arrives, so with PDUs bounded by the
    advertised maximum (``maximum_pdu_size``) an instance never sits in memory as a whole.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True


def build_storage_ae(
    *,
    ae_title: str,
    allowed_aes: Iterable[str | AllowedCaller] = (),
    max_associations: int = 10,
    max_associations_per_address: int = 5,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 30.0,
    network_timeout: float = 60.0,
    association_request_timeout: float = 5.0,
    pdu_receive_timeout: float = 30.0,
    maximum_pdu_size: int = DEFAULT_MAX_PDU_SIZE,
    tls_handshake_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    association_log: AssociationLog | None = None,
    reuse_port: bool = False,
) -> NodeAE:
    """Build the node's Verification + Storage SCP Application Entity.

    Parameters
    ----------
    ae_title
        The node's AE title; the Called AE Title of every association must equal it
        (PS3.8 7.1.1.4).
    allowed_aes
        Allowed calling AEs: ``"AET"``, ``"AET@host"`` (IP, CIDR or host name) or objects
        with ``ae_title`` and ``host``. Empty allows any caller.
    max_associations
        Concurrent connections (associations, and connections still negotiating one); more
        are refused transiently (A-ASSOCIATE-RJ local-limit-exceeded, PS3.8 9.3.4).
    max_associations_per_address
        The same, from one source IP address (capped at ``max_associations``).
    acse_timeout, dimse_timeout, network_timeout
        Seconds (ACSE / DIMSE / idle network timeouts). ``network_timeout`` also bounds one
        send to a peer that does not read.
    association_request_timeout
        Seconds from connection (the end of the TLS handshake under TLS) to a complete
        A-ASSOCIATE-RQ: the ARTIM timer of PS3.8 9.1.5 for the node's associations.
    pdu_receive_timeout
        Seconds a PDU may take from its first byte to its last.
    maximum_pdu_size
        Maximum Length the node advertises (PS3.8 D.1), 4096..16 MiB; a peer's PDU above it
        is refused before it is read (A-ABORT), and the A-ASSOCIATE-RQ may have 64 KiB.
    tls_handshake_timeout
        Seconds a TLS handshake may take, in all (in the connection's own thread).
    ssl_context
        Used by every ``start_server`` of the AE (DICOM TLS, PS3.15 B.1); ``None`` for
        plain TCP.
    association_log
        The receive log (:class:`~integration.association_log.AssociationLog`): every
        association and C-STORE answer of every server the AE starts is recorded there.
    reuse_port
        Listen with ``SO_REUSEPORT`` (Linux), so that several receiver processes share one
        port; each process keeps its own ``max_associations``.

    Returns
    -------
    NodeAE
        The AE, not yet started: call ``ae.start_server((host, port), block=False,
        evt_handlers=integration.scp.handlers(sink))``.

    Raises
    ------
    ValueError
        On an invalid AE title, allow-list entry or limit.
    """
    title = ae_title.strip()
    if not title or len(title) > 16 or "\\" in title:
        raise ValueError(f"AE title {ae_title!r} is not a valid AE title (PS3.5 VR AE)")
    if max_associations < 1:
        raise ValueError(f"maximum associations must be at least 1, got {max_associations}")
    if max_associations_per_address < 1:
        raise ValueError(
            "maximum associations per address must be at least 1, "
            f"got {max_associations_per_address}"
        )
    for name, value in (
        ("ACSE timeout", acse_timeout),
        ("DIMSE timeout", dimse_timeout),
        ("network timeout", network_timeout),
        ("association request timeout", association_request_timeout),
        ("PDU receive timeout", pdu_receive_timeout),
        ("TLS handshake timeout", tls_handshake_timeout),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be greater than 0 seconds, got {value}")
    limits = TransportLimits(  # checks maximum_pdu_size
        max_pdu_size=maximum_pdu_size,
        request_timeout=association_request_timeout,
        pdu_timeout=pdu_receive_timeout,
        send_timeout=network_timeout,
        max_connections=max_associations,
        max_connections_per_address=max_associations_per_address,
        tls_handshake_timeout=tls_handshake_timeout,
    )

    policy = AccessPolicy(rules=tuple(CallerRule.parse(a) for a in allowed_aes))
    recorder = AssociationRecorder(association_log) if association_log is not None else None
    ae = NodeAE(
        title,
        policy=policy,
        ssl_context=ssl_context,
        limits=limits,
        association_recorder=recorder,
        reuse_port=reuse_port,
    )
    ae.require_called_aet = True
    ae.require_calling_aet = []  # checked by the policy, which also knows addresses
    ae.maximum_associations = max_associations
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.maximum_pdu_size = maximum_pdu_size
    for role in (VERIFICATION_SCP, STORAGE_SCP):
        _add_supported(ae, role.sop_classes, role.transfer_syntaxes)
    enable_chunked_receive()
    return ae


def _add_supported(ae: AE, sop_classes: Sequence[str], syntaxes: Sequence[str]) -> None:
    for uid in sop_classes:
        ae.add_supported_context(uid, list(syntaxes))
