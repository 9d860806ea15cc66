"""Network peers of the node's listeners: their addresses, and warnings about them.

Shared by the DICOM association server (:mod:`integration.transport`, PS3.8) and the MLLP
listener (:mod:`integration.mllp_listener`, HL7 v2 appendix C):

- :func:`canonical_ip` gives one text form per IP address (an IPv4-mapped IPv6 address as
  IPv4, no zone index), so that allow-lists and per-address limits match whatever socket
  family accepted the connection;
- :func:`source_address` and :func:`peer_label` name a peer in log lines by address and
  port only;
- :class:`PeerWarnings` logs at most one warning per kind and source address every 10 s,
  so that a flood of refused connections cannot fill the log.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

__all__ = ["PEER_WARNINGS", "PeerWarnings", "canonical_ip", "peer_label", "source_address"]

_LOG_INTERVAL = 10.0  # seconds between two warnings of one kind about one source address


class PeerWarnings:
    """Warnings about peers, at most one per kind and source address every ``interval`` s.

    A hostile peer can make a refusal per connection; the log (and its disk) must not grow
    with them. Suppressed lines are counted in the next one. Thread-safe.

    Parameters
    ----------
    logger
        Where the warnings go.
    interval
        Seconds between two warnings of one kind about one source address.
    capacity
        Pairs (kind, source) remembered before those older than ``interval`` are dropped.
    """

    def __init__(
        self, logger: logging.Logger, interval: float = _LOG_INTERVAL, capacity: int = 1024
    ) -> None:
        self.logger = logger
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
        self.logger.warning(message, *args)


PEER_WARNINGS = PeerWarnings(logging.getLogger("integration.transport"))
"""The association server's warnings about peers (logger ``integration.transport``)."""


def canonical_ip(host: str) -> str:
    """An IP address in canonical text form; IPv4-mapped IPv6 addresses as IPv4.

    A zone index (``fe80::1%eth0``) is dropped.

    Raises
    ------
    ValueError
        ``host`` is not an IP address.
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def source_address(client_address: Any) -> str:
    """The source IP of ``client_address`` (:func:`canonical_ip`; as given if not an IP)."""
    host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
    try:
        return canonical_ip(host)
    except ValueError:
        return host


def peer_label(client_address: Any) -> str:
    """``address:port`` of ``client_address`` for log lines (the address alone without port)."""
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return f"{source_address(client_address)}:{client_address[1]}"
    return source_address(client_address)
