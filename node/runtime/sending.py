"""Sending one delivery's file to its destination, by the destination's kind.

:class:`Transport` holds what every send shares (the DICOM TLS context, the HTTPS client,
the node's timeouts), built once so that a TLS misconfiguration fails start-up, not each
send; :meth:`Transport.send` looks the destination's kind up in a dispatch table:

- DIMSE (``AET@host:port``): C-STORE (PS3.4 Annex B) through
  :func:`integration.scu.send_dataset`, calling AE ``ae_title``, the node's ACSE / DIMSE /
  network timeouts, DICOM TLS (PS3.15 B.1) when ``tls_destinations`` is on;
- STOW-RS (http(s) URLs): :func:`integration.stow.stow` (PS3.18 §10.5);
- HL7 (``mllp://``): :func:`integration.mllp.send_mllp`, the ACK judged by
  :func:`integration.hl7_ack.check_ack` (MSA-1, ERR-3);
- FHIR (``fhir+http(s)://``): :func:`integration.fhir_send.send_transaction` (FHIR
  RESTful API, transaction).

A failure raises :class:`integration.errors.DeliveryError` (``transient`` or not); the caller
(:class:`node.runtime.delivery.DeliveryComponent`) records the outcome.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import httpx
from pydicom import dcmread

from integration.destinations import (
    DicomDestination,
    FhirDestination,
    Hl7Destination,
    StowDestination,
    parse_destination,
)
from integration.fhir_send import send_transaction
from integration.hl7_ack import check_ack
from integration.hl7_oru import message_control_id
from integration.mllp import send_mllp
from integration.scu import send_dataset
from integration.stow import stow
from node.db.models import Delivery, DeliveryKind
from node.settings import Settings
from node.tls import build_client_context, client_context

__all__ = [
    "AnyDestination",
    "AssociationOptions",
    "Sent",
    "Transport",
    "association_options",
    "configured_destination",
    "object_uid",
    "stow_verify",
]

AnyDestination = DicomDestination | StowDestination | Hl7Destination | FhirDestination


def configured_destination(settings: Settings, text: str) -> AnyDestination:
    """The configured destination whose text form is ``text`` (its options: objects, HL7
    receiving application, FHIR token), else one parsed from ``text``."""
    for dest in settings.destinations:
        if str(dest) == text:
            return dest
    return parse_destination(text)


def stow_verify(settings: Settings) -> bool | ssl.SSLContext:
    """How STOW-RS over https verifies the server: ``tls_ca_file`` when set, else system CAs."""
    if settings.tls_ca_file is None:
        return True
    return build_client_context(
        ca_file=settings.tls_ca_file,
        cert_file=settings.tls_cert_file,
        key_file=settings.tls_key_file,
    )


class AssociationOptions(TypedDict):
    """The node's association settings for a DIMSE peer (PS3.8 ACSE, PS3.7 DIMSE, TLS)."""

    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    connection_timeout: float
    ssl_context: ssl.SSLContext | None


def association_options(
    settings: Settings, ssl_context: ssl.SSLContext | None
) -> AssociationOptions:
    """ACSE / DIMSE / network timeouts of ``settings``, a TCP connect timeout of at most
    10 s, and ``ssl_context`` (DICOM TLS, PS3.15 B.1, or ``None``)."""
    return AssociationOptions(
        acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout,
        connection_timeout=min(10.0, settings.acse_timeout),
        ssl_context=ssl_context,
    )


def object_uid(row: Delivery, path: Path) -> str | None:
    """The UID the row names, else for DIMSE and STOW-RS the file's SOP Instance UID
    (0008,0018); ``None`` when neither is known (the send reports an unreadable file)."""
    if row.object_uid is not None or row.kind not in (DeliveryKind.dimse, DeliveryKind.stow):
        return row.object_uid
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(header.get("SOPInstanceUID", "")) or None
    except Exception:  # send_dataset / stow report an unreadable file with the reason
        return None


@dataclass(frozen=True)
class Sent:
    """A send that succeeded: the peer's status, the message logged, a note to keep.

    Parameters
    ----------
    status
        The status as logged (``status 0x0000``, ``HTTP 200``, ``MSA-1 AA``).
    message
        The outcome's message.
    note
        Kept with the row (a C-STORE warning status, PS3.4 B.2.3), else ``None``.
    """

    status: str
    message: str
    note: str | None = None


class Transport:
    """The node's means of sending: DICOM TLS, an HTTPS client, timeouts (built once).

    Parameters
    ----------
    settings
        ``ae_title``, the timeouts, the TLS files, ``destinations`` (their options).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.association = association_options(settings, client_context(settings))
        self.verify = stow_verify(settings)
        self.http = httpx.Client(verify=self.verify, timeout=settings.network_timeout)

    @property
    def dicom_tls(self) -> ssl.SSLContext | None:
        """DICOM TLS for DIMSE peers (``None``: TLS off)."""
        return self.association["ssl_context"]

    @property
    def connection_timeout(self) -> float:
        """TCP connect timeout of every send, at most 10 s."""
        return self.association["connection_timeout"]

    def close(self) -> None:
        """Close the HTTPS client."""
        self.http.close()

    def mllp_ssl(self) -> ssl.SSLContext:
        """TLS for MLLP: the node's CA file (and client certificate) when set, else system CAs."""
        if self.verify is True:
            return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        assert isinstance(self.verify, ssl.SSLContext)
        return self.verify

    def send(self, row: Delivery, path: Path, uid: str | None) -> Sent:
        """Send ``path`` to the row's destination by its kind (:data:`_SENDERS`).

        Raises
        ------
        integration.errors.DeliveryError
            The peer refused it or did not answer (``transient`` says whether to retry).
        """
        dest = configured_destination(self.settings, row.destination)
        return _SENDERS[type(dest)](self, dest, row, path, uid)


def _send_hl7(
    t: Transport, dest: Hl7Destination, row: Delivery, path: Path, uid: str | None
) -> Sent:
    """One MLLP frame; the ACK must answer MSA-2 = MSH-10 with AA or CA."""
    control_id = uid or message_control_id(row.destination, str(row.id))
    raw = send_mllp(
        path.read_bytes(),
        dest.host,
        dest.port,
        connect_timeout=min(dest.timeout, t.connection_timeout),
        read_timeout=dest.timeout,
        ssl_context=t.mllp_ssl() if dest.tls else None,
        server_hostname=dest.host if dest.tls else None,
    )
    ack = check_ack(raw, control_id=control_id)
    return Sent(f"MSA-1 {ack.code}", f"acknowledged {ack.code}")


def _send_fhir(
    t: Transport, dest: FhirDestination, row: Delivery, path: Path, uid: str | None
) -> Sent:
    """The transaction Bundle POSTed to the base URL."""
    fhir = send_transaction(json.loads(path.read_bytes()), dest, client=t.http)
    return Sent(f"HTTP {fhir.http_status}", f"HTTP {fhir.http_status}")


def _send_stow(
    t: Transport, dest: StowDestination, row: Delivery, path: Path, uid: str | None
) -> Sent:
    """STOW-RS of the Part 10 file."""
    result = stow(path, dest, client=t.http)
    return Sent(f"HTTP {result.status}", result.message)


def _send_dimse(
    t: Transport, dest: DicomDestination, row: Delivery, path: Path, uid: str | None
) -> Sent:
    """C-STORE of the Part 10 file on one association; a warning status is kept as a note."""
    result = send_dataset(path, dest, calling_ae=t.settings.ae_title, **t.association)
    note = result.message if result.warning else None
    return Sent(f"status 0x{result.status:04X}", result.message, note)


#: how each kind of destination is sent to
_SENDERS: dict[type, Callable[[Transport, Any, Delivery, Path, str | None], Sent]] = {
    DicomDestination: _send_dimse,
    StowDestination: _send_stow,
    Hl7Destination: _send_hl7,
    FhirDestination: _send_fhir,
}
