"""The bounds the node's association server keeps on one peer (PS3.8 DICOM Upper Layer).

:class:`TransportLimits` is the configuration of
:class:`integration.transport.BoundedAssociationServer`: PDU sizes (PS3.8 9.3.1 and the
Maximum Length of Annex D.1), the deadlines inside a PDU and before the A-ASSOCIATE-RQ
(PS3.8 9.1.5, the ARTIM timer), the send timeout, the connection limits and the TLS
handshake deadline. The module text of :mod:`integration.transport` says how each is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_PDU_SIZE",
    "MAX_PDU_SIZE",
    "MAX_REQUEST_PDU_SIZE",
    "MIN_PDU_SIZE",
    "TransportLimits",
]

DEFAULT_MAX_PDU_SIZE = 1 << 20
"""Maximum Length the node advertises by default (1 MiB)."""
MAX_REQUEST_PDU_SIZE = 64 << 10
"""Limit on the first PDU of a connection (the A-ASSOCIATE-RQ): 64 KiB."""
MIN_PDU_SIZE = 4096
"""Smallest Maximum Length the node may be configured to advertise."""
MAX_PDU_SIZE = 16 << 20
"""Largest Maximum Length the node may be configured to advertise."""


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """The bounds :class:`~integration.transport.BoundedAssociationServer` keeps.

    See the module text of :mod:`integration.transport` for how each is kept.

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

    Raises
    ------
    ValueError
        A value out of its range (sizes, timeouts not above 0, limits below 1).
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
