"""Whether a destination answers again, and re-queueing its failed deliveries when it does.

A destination down for longer than ``delivery_retry_hours`` leaves ``failed`` deliveries
(not permanent ones: those the peer refused stay failed). :func:`recheck_failed_destinations`
(a chore of :mod:`node.runtime.scheduler`, every ``delivery_recheck_minutes``) probes each
configured destination that has such deliveries (:func:`probe_destination`) and re-queues
them when it answers (audited ``delivery.requeue``), waking this process's senders
(:func:`node.runtime.delivery.wake_senders`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import httpx
from sqlalchemy.orm import Session

from integration.destinations import (
    FhirDestination,
    Hl7Destination,
    StowDestination,
    parse_destination,
)
from integration.scu import echo
from node.db import deliveries as deliveries_db
from node.db.models import DeliveryKind
from node.runtime.delivery import wake_senders
from node.runtime.sending import association_options, stow_verify
from node.settings import Settings
from node.tls import client_context

__all__ = ["probe_destination", "recheck_failed_destinations"]

# part of the delivery sender: logs under its name
log = logging.getLogger("node.runtime.delivery")

#: what answering means, by destination kind (the re-queue's audited reason)
_PROBES = {
    DeliveryKind.dimse: "C-ECHO",
    DeliveryKind.stow: "HTTP OPTIONS",
    DeliveryKind.fhir: "HTTP OPTIONS",
    DeliveryKind.hl7: "TCP connect",
}


def probe_destination(settings: Settings, destination: str) -> bool:
    """Whether ``destination`` answers now (bounded by the node's network timeouts).

    DIMSE: a C-ECHO (Verification SOP Class, PS3.4 Annex A) with calling AE ``ae_title``,
    the ACSE / DIMSE / network timeouts and DICOM TLS as for sends, returning 0x0000.
    STOW-RS (PS3.18 §10.5) and FHIR: an HTTP ``OPTIONS`` request to the URL (RFC 9110
    §9.3.7) answered with a status below 500 other than 408 and 429: the origin server is
    up. HL7 MLLP: a TCP connection is accepted. Never raises.
    """
    try:
        dest = parse_destination(destination)
        if isinstance(dest, StowDestination | FhirDestination):
            url = dest.studies_url if isinstance(dest, StowDestination) else dest.base_url
            with httpx.Client(
                verify=stow_verify(settings), timeout=settings.network_timeout
            ) as client:
                status = client.request("OPTIONS", url).status_code
            return status < 500 and status not in (408, 429)
        if isinstance(dest, Hl7Destination):
            with socket.create_connection((dest.host, dest.port), timeout=dest.timeout):
                return True
        options = association_options(settings, client_context(settings))
        return echo(dest, settings.ae_title, **options)
    except Exception as exc:  # unreachable, refused, TLS failure: not answering
        log.info("probe of %s failed: %s", destination, type(exc).__name__)
        return False


def recheck_failed_destinations(
    settings: Settings, session_factory: Callable[[], Session]
) -> dict[str, int]:
    """Re-queue the failed deliveries of destinations that answer again.

    For each configured destination (``settings.destinations``) with ``failed`` deliveries
    that are not permanent failures (:func:`node.db.deliveries.failed_destinations`):
    :func:`probe_destination`; when it answers, its such deliveries go back to ``pending``
    with a fresh retry horizon (:func:`node.db.deliveries.requeue_failed`, audited as
    ``delivery.requeue``) and this process's senders are woken. Destinations no longer
    configured are not contacted (``cxr-node jobs resend`` re-sends by hand).

    Returns
    -------
    dict[str, int]
        Re-queued deliveries per destination that answered.
    """
    configured = {str(d) for d in settings.destinations}
    with session_factory() as session:
        candidates = [d for d in deliveries_db.failed_destinations(session) if d in configured]
    requeued: dict[str, int] = {}
    for destination in candidates:
        if not probe_destination(settings, destination):
            log.info("failed deliveries to %s stay failed: it does not answer", destination)
            continue
        probe = _PROBES[deliveries_db.destination_kind(destination)]
        with session_factory() as session:
            ids = deliveries_db.requeue_failed(session, destination, reason=f"{probe} answered")
        requeued[destination] = len(ids)
    if any(requeued.values()):
        wake_senders()
    return requeued
