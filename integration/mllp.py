"""A small, blocking MLLP client: send one HL7 v2 message, return the raw reply.

MLLP (HL7 v2 Minimal Lower Layer Protocol, release 1) frames a message as
``0x0B`` (start block) + message + ``0x1C 0x0D`` (end block + carriage return) on a TCP
connection (optionally TLS); the receiver answers with one framed ACK on the same
connection. :func:`send_mllp` connects (bounded by ``connect_timeout``), sends one frame,
reads until the end block (bounded by an overall ``read_timeout`` deadline, not per
``recv``, so a peer that trickles bytes cannot hold the sender, and by ``max_reply_bytes``)
and returns the unframed reply for :func:`integration.hl7_oru.check_ack`.

Why not a library: python-hl7's synchronous ``MLLPClient.send_message`` reads the reply
with a single ``recv(4096)`` and so can cut a long ACK or return half a frame; its asyncio
client (``hl7.mllp``) would need an event loop inside the node's synchronous delivery
worker and has no reply size limit; hl7apy ships only a server. This module is the ~60
lines those lack: overall deadline, size cap, TLS through a caller's ``ssl.SSLContext``,
typed errors.

Errors (all :class:`~integration.errors.DeliveryError`, ``transient`` set):

| Situation | Error | transient |
|---|---|---|
| refused, unreachable, DNS failure, TLS handshake failure | ConnectionFailedError | yes |
| connect or reply timeout | DeliveryTimeoutError | yes |
| reply without start block, closed before end block, too long | MllpError | yes |
| message contains 0x0B or 0x1C (cannot be framed) | MllpError | no |

Logs carry host, port and byte counts only.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time

from integration.errors import ConnectionFailedError, DeliveryTimeoutError, MllpError

__all__ = ["END_BLOCK", "START_BLOCK", "frame", "send_mllp"]

LOGGER = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_CHUNK = 65536


def frame(message: bytes) -> bytes:
    """Wrap ``message`` in an MLLP frame; refuse one that contains the block characters."""
    if b"\x0b" in message or b"\x1c" in message:
        raise MllpError("the message contains an MLLP block character (0x0B/0x1C)", transient=False)
    return START_BLOCK + message + END_BLOCK


def send_mllp(
    message: str | bytes,
    host: str,
    port: int,
    *,
    connect_timeout: float = 10.0,
    read_timeout: float = 30.0,
    max_reply_bytes: int = 1 << 20,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    encoding: str = "utf-8",
) -> bytes:
    """Send one HL7 v2 message over MLLP and return the reply without its framing.

    Parameters
    ----------
    message
        The ER7 message (segments separated by CR); ``str`` is encoded with ``encoding``
        (match MSH-18).
    host, port
        The receiver (an interface engine or RIS).
    connect_timeout
        Seconds for the TCP connection and, with TLS, the handshake.
    read_timeout
        Seconds from the end of sending until the whole reply has arrived.
    max_reply_bytes
        Largest reply accepted (framing included).
    ssl_context
        A client TLS context (certificates, verification) for MLLP over TLS; ``None`` for
        plain TCP.
    server_hostname
        Name to verify the receiver's certificate against (default ``host``).
    encoding
        Character encoding of a ``str`` message.

    Returns
    -------
    bytes
        The reply's content between ``0x0B`` and ``0x1C 0x0D`` (normally an ACK).

    Raises
    ------
    integration.errors.ConnectionFailedError
        Connection refused or unreachable, name not resolved, TLS handshake failed.
    integration.errors.DeliveryTimeoutError
        No connection within ``connect_timeout`` or no complete reply within
        ``read_timeout``.
    integration.errors.MllpError
        A reply that is not one MLLP frame, is cut off or exceeds ``max_reply_bytes``
        (transient); a message that cannot be framed (permanent).
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    if connect_timeout <= 0 or read_timeout <= 0 or max_reply_bytes < 3:
        raise ValueError("timeouts must be > 0 and max_reply_bytes >= 3")
    data = frame(message.encode(encoding) if isinstance(message, str) else message)
    peer = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=connect_timeout)
    except TimeoutError as exc:
        raise DeliveryTimeoutError(
            f"no MLLP connection to {peer} within {connect_timeout} s"
        ) from exc
    except OSError as exc:  # refused, unreachable, name resolution
        raise ConnectionFailedError(f"cannot connect to MLLP receiver {peer}: {exc}") from exc
    sock: socket.socket = raw
    try:
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(raw, server_hostname=server_hostname or host)
            except TimeoutError as exc:
                raise DeliveryTimeoutError(f"TLS handshake with {peer} timed out") from exc
            except (ssl.SSLError, OSError) as exc:
                raise ConnectionFailedError(f"TLS handshake with {peer} failed: {exc}") from exc
        try:
            sock.sendall(data)
        except TimeoutError as exc:
            raise DeliveryTimeoutError(f"sending to {peer} timed out") from exc
        except OSError as exc:
            raise ConnectionFailedError(f"sending to {peer} failed: {exc}") from exc
        reply = _read_frame(sock, peer, read_timeout, max_reply_bytes)
    finally:
        sock.close()
    LOGGER.debug("MLLP %s: sent %d bytes, reply %d bytes", peer, len(data), len(reply))
    return reply


def _read_frame(sock: socket.socket, peer: str, read_timeout: float, limit: int) -> bytes:
    deadline = time.monotonic() + read_timeout
    buffer = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeliveryTimeoutError(f"no complete MLLP reply from {peer} in {read_timeout} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(_CHUNK, limit + 1 - len(buffer)))
        except TimeoutError as exc:
            raise DeliveryTimeoutError(
                f"no complete MLLP reply from {peer} in {read_timeout} s"
            ) from exc
        except OSError as exc:
            raise MllpError(f"reading the reply from {peer} failed: {exc}") from exc
        if not chunk:
            what = "without a reply" if not buffer else "before the end block"
            raise MllpError(f"{peer} closed the connection {what}")
        buffer += chunk
        if buffer[:1] != START_BLOCK:
            raise MllpError(f"the reply from {peer} does not start with 0x0B")
        end = buffer.find(END_BLOCK)
        if end != -1:
            return bytes(buffer[1:end])
        if len(buffer) > limit:
            raise MllpError(f"the reply from {peer} exceeds {limit} bytes")
